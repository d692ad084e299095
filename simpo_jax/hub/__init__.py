"""The Hugging Face Hub: downloads of models and data (download.py), model cards and uploads of an
export (publish.py), both through one bounded HTTP client (client.py)."""
