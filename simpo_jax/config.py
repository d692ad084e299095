"""Validation of a run config: every bad value fails early with the field, the value and what is valid."""

from __future__ import annotations

import ml_collections

CHOICES = {
    "loss_type": ("sigmoid", "hinge"),
    "lr_scheduler_type": ("cosine", "linear", "constant_with_warmup"),
    "truncation_mode": ("keep_end", "keep_start"),
    "data_format": ("auto", "ultrafeedback", "messages", "distilabel_math", "plain"),
    "assistant_header_in": ("prompt", "completion"),
    "remat_policy": ("full", "dots", "dots_saveable"),
    "export_dtype": ("bfloat16", "float32"),
    "batch_layout": ("padded", "packed", "shared_prompt"),
    "attention_implementation": ("auto", "xla", "cudnn"),
}
POSITIVE = ("beta", "learning_rate", "max_length", "max_prompt_length", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
            "eval_steps", "save_steps", "pack_max_pairs_per_row")
NON_NEGATIVE = ("gamma_beta_ratio", "sft_weight", "warmup_steps", "weight_decay", "max_grad_norm",
                "warmup_ratio", "pack_row_length", "pack_rows_per_device")
# What config.dataset_mixer holds: a plain dict, whose keys (paths, Hub names) may contain dots, or
# a ConfigDict made with allow_dotted_keys=True. run.py parses --config.dataset_mixer for this type.
DATASET_MIXER_TYPES = (dict, ml_collections.ConfigDict)
DATASET_MIXER_EXAMPLE = '{"/data/prefs.v1/train.jsonl": 1.0, "HuggingFaceH4/ultrafeedback_binarized": 0.5}'


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first invalid field."""
    for field, valid in CHOICES.items():
        if config[field] not in valid:
            raise ValueError(f"config.{field}={config[field]!r}: must be one of {valid}.")
    for field in POSITIVE:
        if not config[field] > 0:
            raise ValueError(f"config.{field}={config[field]!r}: must be > 0.")
    for field in NON_NEGATIVE:
        if config[field] < 0:
            raise ValueError(f"config.{field}={config[field]!r}: must be >= 0.")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise ValueError(f"config.label_smoothing={config.label_smoothing}: must be in [0, 0.5).")
    if config.loss_type == "hinge" and config.label_smoothing:
        raise ValueError(f"config.label_smoothing={config.label_smoothing} does not apply to "
                         "loss_type='hinge': set it to 0.0 or use loss_type='sigmoid'.")
    if config.warmup_ratio > 1:
        raise ValueError(f"config.warmup_ratio={config.warmup_ratio}: must be in [0, 1].")
    if config.max_prompt_length >= config.max_length:
        raise ValueError(f"config.max_prompt_length={config.max_prompt_length} must be smaller than "
                         f"config.max_length={config.max_length}, or no completion token fits.")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ValueError("Set config.max_steps > 0 or config.num_train_epochs > 0.")
    if bool(config.model_name_or_path) == bool(len(config.model_init)):
        raise ValueError("Set exactly one of config.model_name_or_path (a Hugging Face folder) and "
                         "config.model_init (config.json fields for a random initialisation).")
    if not config.model_name_or_path and not config.tokenizer_name_or_path:
        raise ValueError("config.model_init needs config.tokenizer_name_or_path (a tokenizer folder).")
    if not len(config.dataset_mixer):
        raise ValueError("config.dataset_mixer is empty: give {dataset name or local path: fraction "
                         f"or row count}}, e.g. {DATASET_MIXER_EXAMPLE}.")
    for name, amount in config.dataset_mixer.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"config.dataset_mixer key {name!r}: must be a dataset name or local path.")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not (
                0 < amount <= 1 or amount > 1 and float(amount).is_integer()):
            raise ValueError(f"config.dataset_mixer[{name!r}]={amount!r}: must be a fraction in (0, 1] "
                             "or a whole row count > 1.")
