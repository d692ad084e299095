"""Model card and upload of an exported Hugging Face folder to the Hub."""

from __future__ import annotations

import json
import os

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


def model_card(config, eval_metrics: dict | None, effective_batch: int | None = None) -> str:
    """README.md for the exported folder: base model, data, SimPO settings, eval metrics, citation."""
    base = config.model_name_or_path or "randomly initialised ({})".format(
        config.model_init.get("model_type", "?") if len(config.model_init) else "?")
    datasets = list(config.dataset_mixer.keys())
    front = ["---", "library_name: transformers", "tags:", "- simpo", "- simpo_jax",
             "- alignment"]
    if config.model_name_or_path and not os.path.isabs(config.model_name_or_path):
        front.append(f"base_model: {config.model_name_or_path}")
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


def read_eval_metrics(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, "eval_results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def hub_api():
    """The Hub client (HF_ENDPOINT and HF_TOKEN apply); tests swap in a local stand-in."""
    from huggingface_hub import HfApi

    return HfApi()


def push(out_dir: str, repo_id: str, *, private: bool = False, api=None) -> str:
    """Uploads `out_dir` to `repo_id`; errors say why and that the local export is kept."""
    if not repo_id:
        raise ValueError("push_to_hub=True needs config.hub_model_id (e.g. 'your-name/model-simpo').")
    api = api or hub_api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=out_dir,
                                 commit_message="Upload SimPO model trained with simpo_jax")
    except Exception as e:
        raise RuntimeError(
            f"Uploading {out_dir} to the Hub as {repo_id} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The local export in {out_dir} is kept; "
            "check the network and the token (huggingface-cli login or HF_TOKEN), then rerun with "
            "--mode=export.") from e
    return str(getattr(info, "commit_url", info))
