"""Validation of a run config: every bad value fails early with the field, the value and what is valid."""

from __future__ import annotations

import difflib

import ml_collections

from simpo_jax import lora, precision
from simpo_jax.errors import UserError


CHOICES = {
    "loss_type": ("sigmoid", "hinge"),
    "lr_scheduler_type": ("cosine", "linear", "constant_with_warmup"),
    "truncation_mode": ("keep_end", "keep_start"),
    "data_format": ("auto", "ultrafeedback", "messages", "distilabel_math", "plain"),
    "assistant_header_in": ("prompt", "completion"),
    "remat_policy": ("full", "dots", "dots_saveable"),
    "export_dtype": ("bfloat16", "float32"),
    "batch_layout": ("padded", "packed", "shared_prompt"),
    "attention_implementation": ("auto", "xla", "cudnn", "splash", "flash"),
    "rm_eval_baseline": ("model", "chosen"),
    "master_weights": precision.MASTER_WEIGHTS,
    "optimizer_state_dtype": precision.STATE_DTYPES,
    "plan_gpu_compiler": ("tpu", "cpu"),
    "lora_base_quantization": lora.QUANTIZATIONS,
}
POSITIVE = ("beta", "learning_rate", "max_length", "max_prompt_length", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
            "eval_steps", "save_steps", "pack_max_pairs_per_row", "generation_num_samples",
            "generation_max_new_tokens", "generation_per_device_batch_size",
            "generation_shard_prompts", "reward_per_device_batch_size")
NON_NEGATIVE = ("gamma_beta_ratio", "sft_weight", "warmup_steps", "weight_decay", "max_grad_norm",
                "warmup_ratio", "pack_row_length", "pack_rows_per_device", "generation_temperature",
                "rm_eval_num_prompts")
# What config.dataset_mixer holds: a plain dict, whose keys (paths, Hub names) may contain dots, or
# a ConfigDict made with allow_dotted_keys=True. run.py parses --config.dataset_mixer for this type.
DATASET_MIXER_TYPES = (dict, ml_collections.ConfigDict)
DATASET_MIXER_EXAMPLE = '{"/data/prefs.v1/train.jsonl": 1.0, "HuggingFaceH4/ultrafeedback_binarized": 0.5}'


def check_fields(config: ml_collections.ConfigDict, source: str = "") -> None:
    """Raises UserError when `config` has a field configs/base.py does not define, or lacks one.

    ml_collections lets a config file add fields (`c.learnig_rate = 1e-1` would train at the
    default rate); the lock on the command line comes after that. `model_init` (config.json fields)
    and `dataset_mixer` (data set names) hold free-form keys and are not compared. `source` names
    where the config came from (its file) in the message.
    """
    from configs import base

    fields = set(base.get_config().keys())
    unknown = sorted(set(config.keys()) - fields)
    if unknown:
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            named.append(f"config.{name}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        verb = "is not a config field" if len(named) == 1 else "are not config fields"
        raise UserError((f"{source} sets {' and '.join(named)}, which {verb}" if source else
                         f"{' and '.join(named)} {verb}") + "; configs/base.py lists the fields.")
    missing = sorted(fields - set(config.keys()))
    if missing:
        raise UserError(f"{source or 'the config'} has no field {', '.join(missing)}: start a "
                        "config file from configs/base.py's get_config() (or another file in "
                        "configs/) and change the fields it needs.")


def validate(config: ml_collections.ConfigDict, source: str = "") -> None:
    """Raises UserError naming an unknown field or the first invalid value."""
    check_fields(config, source)
    for field, valid in CHOICES.items():
        if config[field] not in valid:
            raise UserError(f"config.{field}={config[field]!r}: must be one of {valid}.")
    for field in POSITIVE:
        if not config[field] > 0:
            raise UserError(f"config.{field}={config[field]!r}: must be > 0.")
    for field in NON_NEGATIVE:
        if config[field] < 0:
            raise UserError(f"config.{field}={config[field]!r}: must be >= 0.")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise UserError(f"config.label_smoothing={config.label_smoothing}: must be in [0, 0.5).")
    if config.loss_type == "hinge" and config.label_smoothing:
        raise UserError(f"config.label_smoothing={config.label_smoothing} does not apply to "
                        "loss_type='hinge': set it to 0.0 or use loss_type='sigmoid'.")
    validate_generation(config)
    validate_lora(config)
    if config.warmup_ratio > 1:
        raise UserError(f"config.warmup_ratio={config.warmup_ratio}: must be in [0, 1].")
    if config.max_prompt_length >= config.max_length:
        raise UserError(f"config.max_prompt_length={config.max_prompt_length} must be smaller than "
                        f"config.max_length={config.max_length}, or no completion token fits.")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise UserError("Set config.max_steps > 0 or config.num_train_epochs > 0.")
    if bool(config.model_name_or_path) == bool(len(config.model_init)):
        raise UserError("Set exactly one of config.model_name_or_path (a Hugging Face folder) and "
                        "config.model_init (config.json fields for a random initialisation).")
    if not config.model_name_or_path and not config.tokenizer_name_or_path:
        raise UserError("config.model_init needs config.tokenizer_name_or_path (a tokenizer folder).")
    if config.push_to_hub and not config.hub_model_id:
        raise UserError("config.push_to_hub=True needs config.hub_model_id (e.g. "
                        "'your-name/mistral-7b-simpo'): checked now, not after training.")
    if not len(config.dataset_mixer):
        raise UserError("config.dataset_mixer is empty: give {dataset name or local path: fraction "
                        f"or row count}}, e.g. {DATASET_MIXER_EXAMPLE}.")
    for name, amount in config.dataset_mixer.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"config.dataset_mixer key {name!r}: must be a dataset name or local path.")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not (
                0 < amount <= 1 or amount > 1 and float(amount).is_integer()):
            raise UserError(f"config.dataset_mixer[{name!r}]={amount!r}: must be a fraction in (0, 1] "
                            "or a whole row count > 1.")


def validate_lora(config: ml_collections.ConfigDict) -> None:
    """The LoRA fields; lora_rank > 0 turns LoRA on."""
    rank = config.lora_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"config.lora_rank={rank!r}: must be an integer >= 0 (0 = full "
                        "fine-tuning).")
    if not rank:
        if config.hub_push_adapter_only:
            raise UserError("config.hub_push_adapter_only=True pushes a LoRA adapter: set "
                            "lora_rank > 0, or False to push the model.")
        if config.lora_base_quantization != "none":
            raise UserError(f"config.lora_base_quantization={config.lora_base_quantization!r} "
                            "quantises a frozen LoRA base: set lora_rank > 0 (e.g. 16), or "
                            "'none' for full fine-tuning.")
        return
    if not config.lora_alpha > 0:
        raise UserError(f"config.lora_alpha={config.lora_alpha!r}: must be > 0 (usually 2 x "
                        f"lora_rank = {2 * rank}).")
    if config.lora_dropout != 0.0:
        raise UserError(f"config.lora_dropout={config.lora_dropout!r}: only 0.0 is implemented "
                        "(no dropout on the adapters' input); set it to 0.0.")
    targets = tuple(config.lora_target_modules)
    bad = [t for t in targets if t not in lora.TARGET_MODULES]
    if not targets or bad or len(set(targets)) != len(targets):
        raise UserError(f"config.lora_target_modules={targets}: give distinct names among "
                        f"{lora.TARGET_MODULES} (embeddings and the LM head are never adapted).")


def validate_generation(config: ml_collections.ConfigDict) -> None:
    """The on-policy fields (--mode=generate, --mode=rm_eval) that need more than a sign."""
    if len(config.generation_seeds) != config.generation_num_samples:
        raise UserError(f"config.generation_seeds={tuple(config.generation_seeds)} has "
                        f"{len(config.generation_seeds)} seeds for generation_num_samples="
                        f"{config.generation_num_samples}: give one seed per answer.")
    if not 0.0 < config.generation_top_p <= 1.0:
        raise UserError(f"config.generation_top_p={config.generation_top_p}: must be in (0, 1].")
    if not 0.0 <= config.generation_test_fraction < 1.0:
        raise UserError(f"config.generation_test_fraction={config.generation_test_fraction}: must "
                        "be in [0, 1).")
