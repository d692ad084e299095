"""Publishing to the Hub: the model card, the start-up upload notice, and the push of exactly an
export's files (the model, or its PEFT adapter alone)."""

from __future__ import annotations

import json
import os
import re
import shutil

from simpo_jax.errors import HubError
from simpo_jax.hub import client
from simpo_jax.hub.download import CONFIG_FILES, TOKENIZER_FILES, WEIGHTS_INDEX
from simpo_jax.lora import ADAPTER_DIR
from simpo_jax.paths import resolve_local

CITATION = """@inproceedings{meng2024simpo,
  title={{SimPO}: Simple Preference Optimization with a Reference-Free Reward},
  author={Meng, Yu and Xia, Mengzhou and Chen, Danqi},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2024}
}"""

HYPERPARAMETERS = ("beta", "gamma_beta_ratio", "loss_type", "label_smoothing", "sft_weight",
                   "learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs",
                   "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "max_length", "max_prompt_length", "seed", "bf16")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+$")  # HF_HUB_CACHE layout


def base_model_hub_id(name_or_path: str) -> str:
    """The Hub repo id of the base model: as given, or read from a Hugging Face cache snapshot
    folder; "" for any other local folder."""
    local = resolve_local(name_or_path) if name_or_path else None
    if local is None:
        return name_or_path
    cached = CACHE_SNAPSHOT.search(os.path.normpath(local))
    return f"{cached[1]}/{cached[2]}" if cached else ""


def base_model_name(name_or_path: str) -> str:
    """The base model as a published card or adapter names it: its Hub repo id, else its folder's
    name; never a local path, which would tell nothing to a reader and leak the author's disk."""
    hub_id = base_model_hub_id(name_or_path)
    if hub_id or not name_or_path:
        return hub_id
    return os.path.basename(os.path.normpath(resolve_local(name_or_path)))


def model_card(config, eval_metrics: dict | None, effective_batch: int | None = None) -> str:
    """README.md for the exported folder: base model, data, SimPO settings, eval metrics, citation."""
    base = base_model_name(config.model_name_or_path) or "randomly initialised ({})".format(
        config.model_init.get("model_type", "?") if len(config.model_init) else "?")
    datasets = list(config.dataset_mixer.keys())
    front = ["---", "library_name: transformers", "tags:", "- simpo", "- simpo_jax",
             "- alignment"]
    if base_model_hub_id(config.model_name_or_path):
        front.append(f"base_model: {base_model_hub_id(config.model_name_or_path)}")
    front += ["datasets:"] + [f"- {d}" for d in datasets] + ["---", ""]
    lines = [f"# {config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))}", "",
             f"Aligned from **{base}** with SimPO (Simple Preference Optimization) using simpo_jax.",
             "", "## Data", ""] + [f"- {d}: {config.dataset_mixer[d]}" for d in datasets]
    lines += ["", "## SimPO hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {config[k]} |" for k in HYPERPARAMETERS]
    if effective_batch:
        lines.append(f"| effective batch (pairs) | {effective_batch} |")
    lines += ["", "## Final evaluation", ""]
    if eval_metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(eval_metrics.items())
                  if isinstance(v, (int, float))]
    else:
        lines.append("No evaluation metrics were recorded.")
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(front + lines)


def write_model_card(out_dir: str, config, eval_metrics: dict | None,
                     effective_batch: int | None = None) -> str:
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write(model_card(config, eval_metrics, effective_batch))
    return path


def upload_notice(config) -> str:
    """The start-up line that says where the export will be uploaded and who can see it."""
    visibility = ("private (hub_private_repo=True)" if config.hub_private_repo else
                  "PUBLIC, so anyone can download it (hub_private_repo=True keeps it private)")
    return (f"push_to_hub: at the end the model, tokenizer and model card (nothing else) are "
            f"uploaded to {config.hub_model_id or '<hub_model_id is not set>'}; a new repo is "
            f"created {visibility}.")


def export_files(out_dir: str) -> list[str]:
    """The files of a Hugging Face export in `out_dir`: config, weights, tokenizer, model card.

    Never checkpoints, logs, plots, samples or data reports, whatever else the folder holds.
    """
    present = set(os.listdir(out_dir))
    if "adapter_config.json" in present:  # a PEFT adapter folder (LoRA, hub_push_adapter_only)
        files = [f for f in ADAPTER_FILES + TOKENIZER_FILES + ("README.md",) if f in present]
        missing = [f for f in ADAPTER_FILES if f not in present]
        if missing:
            raise HubError(f"{out_dir} is not a complete PEFT adapter (missing {missing}); "
                           "run --mode=export first.")
        return files
    files = [f for f in CONFIG_FILES + TOKENIZER_FILES + ("README.md",) if f in present]
    if WEIGHTS_INDEX in present:
        with open(os.path.join(out_dir, WEIGHTS_INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files += [WEIGHTS_INDEX] + shards
    elif "model.safetensors" in present:
        files.append("model.safetensors")
    missing = [f for f in ("config.json",) + tuple(files) if f not in present]
    if missing or not any(f.endswith(".safetensors") for f in files):
        raise HubError(f"{out_dir} is not a complete export (missing {missing or 'weights'}); "
                       "run --mode=export first.")
    return files


def push_export(out_dir: str, config) -> str:
    """Uploads the export in `out_dir` as config.hub_model_id: the model, or with
    hub_push_adapter_only its PEFT adapter with the card and tokenizer; the commit's url."""
    folder = out_dir
    if config.hub_push_adapter_only:
        folder = os.path.join(out_dir, ADAPTER_DIR)
        for name in ("README.md",) + TOKENIZER_FILES:
            if os.path.exists(os.path.join(out_dir, name)):
                shutil.copy(os.path.join(out_dir, name), folder)
    url = push(folder, config.hub_model_id, private=config.hub_private_repo)
    print(f"Pushed {folder} to {url}", flush=True)
    return url


def hub_api():
    """The Hub client (HF_ENDPOINT and HF_TOKEN apply); tests swap in a local stand-in."""
    from huggingface_hub import HfApi

    return HfApi()


def push(out_dir: str, repo_id: str, *, private: bool = False, api=None) -> str:
    """Uploads exactly the export's files of `out_dir` to `repo_id`; stale weight shards go.

    Each Hub call is bounded (client.py: timeouts, retries on 5xx); a failure is one HubError that
    says why and that the local export is kept.
    """
    if not repo_id:
        raise HubError("push_to_hub=True needs config.hub_model_id (e.g. 'your-name/model-simpo').")
    files = export_files(out_dir)
    client.bound()
    api = api or hub_api()
    what = f"Uploading {out_dir} to the Hub as {repo_id}"
    try:
        client.with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what)
        info = client.with_retries(lambda: api.upload_folder(
            repo_id=repo_id, folder_path=out_dir, allow_patterns=files,
            delete_patterns=["*.safetensors", WEIGHTS_INDEX],
            commit_message="Upload SimPO model trained with simpo_jax"), what)
    except Exception as e:
        raise HubError(
            f"{what} failed ({client.first_line(e)}). The local export in {out_dir} is kept; "
            "check the network and the token (hf auth login or HF_TOKEN), then rerun with "
            "--mode=export.") from e
    return str(getattr(info, "commit_url", info))
