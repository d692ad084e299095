"""The run config: one schema (schema.py), the rules between fields (rules.py), and the checks that
turn a ConfigDict into a validated run config (load.py). `python -m simpo_jax.config` lists it."""

from simpo_jax.config.load import DATASET_MIXER_TYPES, check_fields, defaults, validate
from simpo_jax.config.rules import DATASET_MIXER_EXAMPLE

__all__ = ["DATASET_MIXER_EXAMPLE", "DATASET_MIXER_TYPES", "check_fields", "defaults", "validate"]
