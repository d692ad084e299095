"""plan_search: the settings the planner tries after the config's own, each keeping the
effective batch, and the --config.* overrides that turn a config into one of them."""

from __future__ import annotations

# plan_search: changes applied one after another (each keeps the ones before), cheapest in step
# time first; the first setting that fits wins. Every change keeps the effective batch.
SEARCH = (
    {"gradient_checkpointing": True, "remat_policy": "full"},
    {"logits_chunk_size": 256},
    {"optimizer_state_dtype": "bfloat16"},
    {"master_weights": "bfloat16_kahan"},
    {"offload_optimizer_state": True},  # moments and Kahan compensation to host memory
    "halve per_device_train_batch_size",  # doubling gradient_accumulation_steps, down to 1
    {"mesh_tensor": 2},  # halves the data-parallel devices: accumulation doubles
)
# Not searched: bfloat16_stochastic masters. Once the optimizer state is in host memory they hold
# the same device bytes as bfloat16_kahan, with more temporaries (the random bits) and noisier
# updates (Mistral-7B on tpu-v5e-8: docs/memory_plans.md); they help where host memory is short.
SETTING_FIELDS = ("lora_rank", "lora_base_quantization", "gradient_checkpointing", "remat_policy",
                  "logits_chunk_size", "master_weights",
                  "optimizer_state_dtype", "offload_optimizer_state", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "mesh_data", "mesh_fsdp", "mesh_tensor")


def setting_of(config) -> dict:
    """The config fields the planner varies, as the config has them."""
    return {k: config[k] for k in SETTING_FIELDS}


def candidates(config, num_devices: int = 8) -> list[dict]:
    """Settings to try (SETTING_FIELDS values): the config's own, then SEARCH's changes in turn.

    A tensor axis needs at least two devices: on one it is not tried."""
    current = setting_of(config)
    out = [dict(current)]
    if not config.plan_search:
        return out
    for change in SEARCH:
        if change == "halve per_device_train_batch_size":
            while current["per_device_train_batch_size"] > 1:
                pd = current["per_device_train_batch_size"]
                smaller = pd // 2 if pd % 2 == 0 else 1
                current = dict(current, per_device_train_batch_size=smaller,
                               gradient_accumulation_steps=current["gradient_accumulation_steps"]
                               * (pd // smaller))
                out.append(dict(current))
            continue
        if change.get("logits_chunk_size") and current["logits_chunk_size"]:
            continue  # the config already chunks the head
        if change.get("mesh_tensor") and num_devices < 2:
            continue
        updated = dict(current, **change)
        if change.get("mesh_tensor") and current["mesh_tensor"] == 1:
            # A tensor axis of 2 halves the data-parallel devices: twice the accumulation.
            updated["gradient_accumulation_steps"] = current["gradient_accumulation_steps"] * 2
        if updated != current:
            current = updated
            out.append(dict(current))
    return out


def with_setting(config, setting: dict):
    """A copy of the config with a setting's fields."""
    c = config.copy_and_resolve_references()
    for k, v in setting.items():
        c[k] = v
    return c


def overrides(config, setting: dict) -> list[str]:
    """The --config.* flags that turn the config into `setting`."""
    flags = []
    for k in SETTING_FIELDS:
        if setting[k] != config[k]:
            flags.append(f"--config.{k}={setting[k]}")
    return flags
