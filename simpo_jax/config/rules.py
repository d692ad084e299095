"""The rules between fields of a run config, checked after each field alone passed its schema."""

from __future__ import annotations

from simpo_jax.config.choices import BatchLayout, LoraTarget, LossType, ReportSink
from simpo_jax.errors import UserError

DATASET_MIXER_EXAMPLE = '{"/data/prefs.v1/train.jsonl": 1.0, "HuggingFaceH4/ultrafeedback_binarized": 0.5}'
MESH_FIELDS = ("mesh_data", "mesh_fsdp", "mesh_tensor")


def check(config) -> None:
    """Raises UserError naming the first rule `config` breaks."""
    if config.loss_type == LossType.HINGE and config.label_smoothing:
        raise UserError(f"config.label_smoothing={config.label_smoothing} does not apply to "
                        "loss_type='hinge': set it to 0.0 or use loss_type='sigmoid'.")
    check_generation(config)
    check_lora(config)
    check_lengths(config)
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
    check_dataset_mixer(config.dataset_mixer)
    check_mesh(config)
    unknown = [s for s in config.report_to if s not in ReportSink.values()]
    if unknown:
        raise UserError(f"config.report_to={list(config.report_to)}: unknown sink(s) {unknown}; "
                        f"valid: {list(ReportSink.values())} (metrics.jsonl is always written).")


def check_lora(config) -> None:
    """The LoRA fields; lora_rank > 0 turns LoRA on."""
    rank = config.lora_rank
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
    bad = [t for t in targets if t not in LoraTarget.values()]
    if not targets or bad or len(set(targets)) != len(targets):
        raise UserError(f"config.lora_target_modules={targets}: give distinct names among "
                        f"{LoraTarget.values()} (embeddings and the LM head are never adapted).")


def check_generation(config) -> None:
    """The on-policy fields (--mode=generate, --mode=rm_eval) that need more than a bound."""
    if len(config.generation_seeds) != config.generation_num_samples:
        raise UserError(f"config.generation_seeds={tuple(config.generation_seeds)} has "
                        f"{len(config.generation_seeds)} seeds for generation_num_samples="
                        f"{config.generation_num_samples}: give one seed per answer.")


def check_lengths(config) -> None:
    """Prompt, bucket and packed-row lengths against max_length: a pair of max_length tokens fits."""
    if config.max_prompt_length >= config.max_length:
        raise UserError(f"config.max_prompt_length={config.max_prompt_length} must be smaller than "
                        f"config.max_length={config.max_length}, or no completion token fits.")
    buckets = tuple(config.length_buckets)
    if buckets and (min(buckets) <= 0 or list(buckets) != sorted(set(buckets))
                    or buckets[-1] < config.max_length):
        raise UserError(f"config.length_buckets={buckets}: give increasing positive token counts, "
                        f"the last >= max_length={config.max_length} (a pair may reach it), or () "
                        "for powers of 2 from 64 up to max_length.")
    row = config.pack_row_length
    if config.batch_layout != BatchLayout.PADDED and 0 < row < config.max_length:
        raise UserError(f"config.pack_row_length={row} is shorter than max_length="
                        f"{config.max_length}, so a pair that reaches max_length never fits a row; "
                        f"set it >= {config.max_length}, or 0 for 2 * max_length.")


def check_dataset_mixer(mixer) -> None:
    """At least one entry; each a name and a fraction in (0, 1] or a whole row count."""
    if not len(mixer):
        raise UserError("config.dataset_mixer is empty: give {dataset name or local path: fraction "
                        f"or row count}}, e.g. {DATASET_MIXER_EXAMPLE}.")
    for name, amount in mixer.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"config.dataset_mixer key {name!r}: must be a dataset name or local path.")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not (
                0 < amount <= 1 or amount > 1 and float(amount).is_integer()):
            raise UserError(f"config.dataset_mixer[{name!r}]={amount!r}: must be a fraction in (0, 1] "
                            "or a whole row count > 1.")


def check_mesh(config) -> None:
    """At most one mesh axis fills the devices; their count is checked once devices are known."""
    sizes = {name.removeprefix("mesh_"): config[name] for name in MESH_FIELDS}
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"At most one of mesh_data/mesh_fsdp/mesh_tensor may be -1, got {sizes}.")
