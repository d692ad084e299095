"""alignment-handbook / original-SimPO YAML recipes, run unchanged on top of the schema's defaults.

Keys that are base config fields are taken as they are (same names). Keys that only matter to the
PyTorch tooling are accepted and reported as ignored or mapped; any other key is an error that
lists every unknown key.
"""

from __future__ import annotations

import os

import ml_collections
import yaml

from simpo_jax.config.load import defaults

# PyTorch/transformers-only keys: accepted, with the reason they do not apply here.
IGNORED = {
    "optim": "the optimizer is optax AdamW (adam_beta1/2, adam_epsilon, weight_decay)",
    "attn_implementation": "attention kernels are chosen by backend (cuDNN on GPU, XLA elsewhere)",
    "gradient_checkpointing_kwargs": "remat is set by gradient_checkpointing and remat_policy",
    "log_level": "logging is configured by simpo_jax",
    "do_eval": "evaluation runs every eval_steps and at the end when a test split exists",
    "evaluation_strategy": "evaluation runs every eval_steps",
    "eval_strategy": "evaluation runs every eval_steps",
    "save_strategy": "checkpoints are saved every save_steps",
    "logging_strategy": "metrics are logged every logging_steps",
    "logging_first_step": "an eval row is always written before the first step",
    "run_name": "the run is named by output_dir",
    "ddp_timeout": "no torch.distributed; JAX's coordinator handles processes",
    "tf32": "XLA chooses matmul precision",
    "use_flash_attention_2": "attention kernels are chosen by backend",
    "overwrite_output_dir": "a run resumes from output_dir's latest checkpoint instead",
    "remove_unused_columns": "the data pipeline keeps only what it needs",
    "hub_strategy": "the export is pushed once, at --mode=export or the end",
    "dataloader_num_workers": "batches are prefetched by a background thread",
    "torch_compile": "the step is jitted by XLA",
}


def _convert(field: str, value, default):
    """YAML value -> the type of the base config field (YAML 1.1 reads 5e-7 as a string)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{field}: {value!r} is not true/false.")
        return value
    if isinstance(default, float) and isinstance(value, (int, float, str)):
        return float(value)
    if isinstance(default, int) and isinstance(value, (int, str)):
        return int(value)
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(default, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value, allow_dotted_keys=True)
    return value


def load_yaml_recipe(path: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(config, notes): the recipe's values over configs/base.py, and what was ignored or mapped."""
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e}).") from e
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping of field: value, got {type(recipe).__name__}.")
    config, notes, unknown = defaults(), [], []
    gamma = recipe.pop("gamma", None)
    if gamma is not None and "gamma_beta_ratio" in recipe:
        raise ValueError(f"{path}: sets both gamma={gamma} and gamma_beta_ratio="
                         f"{recipe['gamma_beta_ratio']}; keep one (gamma is mapped to "
                         "gamma_beta_ratio = gamma / beta).")
    for key, value in recipe.items():
        if key in config:
            if key == "report_to":
                value = [value] if isinstance(value, str) else list(value or [])
                kept = [v for v in value if v in ("tensorboard", "wandb")]
                if kept != value:
                    notes.append(f"report_to: {sorted(set(value) - set(kept))} ignored "
                                 "(supported: tensorboard, wandb)")
                value = tuple(kept)
            try:
                config[key] = _convert(key, value, config[key])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {key}={value!r} does not fit the field ({e}).") from e
        elif key == "torch_dtype":
            if value == "bfloat16":
                config.bf16 = True
                notes.append("torch_dtype: bfloat16 mapped to bf16=True")
            else:
                notes.append(f"torch_dtype: {value!r} ignored (parameters are float32 masters; "
                             "bf16 sets the compute dtype)")
        elif key == "model_revision":
            config.revision = "" if value in (None, "main") else str(value)
            notes.append(f"model_revision: {value!r} mapped to revision")
        elif key == "fp16":
            if value:
                config.bf16 = True
                notes.append("fp16: true mapped to bf16=True (TPUs and JAX use bfloat16)")
        elif key in IGNORED:
            notes.append(f"{key}: ignored ({IGNORED[key]})")
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; valid keys are the fields "
                         f"of configs/base.py plus the PyTorch-only keys {sorted(IGNORED)} (ignored).")
    if gamma is not None:
        config.gamma_beta_ratio = float(gamma) / config.beta
        notes.append(f"gamma: {gamma} mapped to gamma_beta_ratio={config.gamma_beta_ratio:g} "
                     f"(gamma / beta)")
    return config, notes


def get_config(path: str) -> ml_collections.ConfigDict:
    """config_flags entry point: `--config=configs/recipe.py:PATH.yaml` (run.py maps a bare
    `--config=PATH.yaml` to this)."""
    config, notes = load_yaml_recipe(os.path.expanduser(path))
    for note in notes:
        print(f"recipe {os.path.basename(path)}: {note}")
    return config
