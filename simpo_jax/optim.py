"""AdamW with clipping and transformers-compatible learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from simpo_jax import precision
from simpo_jax.sharding import path_str


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float
    master_weights: str  # precision.MASTER_WEIGHTS
    optimizer_state_dtype: str  # precision.STATE_DTYPES
    seed: int  # stochastic rounding's random stream

    @classmethod
    def from_config(cls, config) -> "OptimConfig":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def num_warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """transformers' TrainingArguments.get_warmup_steps: warmup_steps wins, else ceil(ratio·total)."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(total_steps * cfg.warmup_ratio)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate of optimizer update `count` (0-based), as transformers' LambdaLR gives it."""
    warmup = num_warmup_steps(cfg, total_steps)
    peak = cfg.learning_rate
    kind = cfg.lr_scheduler_type

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        elif kind == "linear":
            after = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup))
        else:
            after = jnp.ones_like(step)
        return peak * jnp.where(step < warmup, warm, after)

    return schedule


def decay_mask(params):
    """True where weight decay applies: never on norms or biases (as transformers' Trainer)."""

    def one(path, _):
        name = path_str(path).lower()
        return not ("norm" in name or name.endswith("bias") or ".bias." in name)

    return jax.tree_util.tree_map_with_path(one, params)


def range_test_schedule(min_lr: float, max_lr: float, steps: int) -> optax.Schedule:
    """The LR range test's exponential sweep: min_lr at step 0 to max_lr at step steps - 1."""
    ratio = max_lr / min_lr

    def schedule(count):
        frac = jnp.asarray(count, jnp.float32) / max(1, steps - 1)
        return min_lr * ratio ** jnp.minimum(frac, 1.0)

    return schedule


def make_optimizer(cfg: OptimConfig, total_steps: int, schedule: optax.Schedule | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay masked off norms and biases) after global-norm clipping; the LR schedule.

    The memory modes (simpo_jax/precision.py) add float32 gradients first, bfloat16 moments inside
    AdamW, and the rounding to bfloat16 masters last; the float32 default is optax's adamw as is.
    """
    schedule = schedule or make_schedule(cfg, total_steps)
    if cfg.optimizer_state_dtype == "float32":
        adamw = optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                            weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        adamw = optax.chain(
            precision.scale_by_adam(cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon,
                                    cfg.optimizer_state_dtype, seed=cfg.seed),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
            optax.scale_by_learning_rate(schedule))
    parts = [adamw]
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(cfg.max_grad_norm))
    if cfg.master_weights != "float32":
        parts = [precision.to_float32(), *parts,
                 precision.round_to_master(cfg.master_weights, seed=cfg.seed)]
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule
