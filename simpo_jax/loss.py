"""The SimPO objective: completion log-probabilities, the loss and its metrics.

Shapes: B pairs, 2 sequences per pair (0 = chosen, 1 = rejected), T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Metric names of the reference implementations (TRL's CPO/SimPO trainers), reduced by
# `finalize_metrics` from the per-batch sums `pair_metric_sums` returns.
PAIR_METRICS = (
    "loss", "simpo_loss", "sft_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    beta: float
    gamma_beta_ratio: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        return cls(beta=config.beta, gamma_beta_ratio=config.gamma_beta_ratio,
                   loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                   sft_weight=config.sft_weight)


def simpo_loss(chosen_logps, rejected_logps, *, beta, gamma_beta_ratio, loss_type="sigmoid",
               label_smoothing=0.0):
    """Per-pair SimPO losses and rewards from average completion log-probabilities.

    z = chosen_logps - rejected_logps - gamma_beta_ratio;
    sigmoid: -log σ(β·z)·(1-ε) - log σ(-β·z)·ε;  hinge: max(0, 1 - β·z) (ε does not apply).
    Returns (losses, chosen_rewards, rejected_rewards), rewards = β·avg_logp without gradient.
    """
    z = chosen_logps - rejected_logps - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (-jax.nn.log_sigmoid(beta * z) * (1.0 - label_smoothing)
                  - jax.nn.log_sigmoid(-beta * z) * label_smoothing)
    else:
        losses = jax.nn.relu(1.0 - beta * z)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logps)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def completion_mask(completion_start, lengths, num_tokens):
    """[..., T-1] mask over next-token targets 1..T-1: target j is scored iff start <= j < length.

    The one rule for what is scored: completion tokens with index >= 1 (token 0 has no
    predictor), so an empty prompt's first completion token is not. Built from positions and
    lengths, never from token ids (pad may equal EOS).
    """
    targets = jnp.arange(1, num_tokens)
    return ((targets >= completion_start[..., None]) & (targets < lengths[..., None]))


def pair_weights(counts, pair_mask):
    """([B] 1.0 for a pair that counts, the number of such pairs, their chosen scored tokens).

    counts [B, 2]: scored tokens of chosen and rejected; a pair counts when it is real (pair_mask)
    and both sides have scored tokens. The loss is a mean over these pairs and the SFT term a mean
    over these tokens: the train step's denominators come from this function too.
    """
    valid = pair_mask * (counts[:, 0] > 0) * (counts[:, 1] > 0)
    return valid, valid.sum(), (counts[:, 0] * valid).sum()


def pair_metric_sums(logps, counts, mean_logits, pair_mask, token_sums, cfg: LossConfig):
    """Loss numerator and metric sums over pairs; divide by the number of valid pairs.

    logps, counts, mean_logits: [B, 2]; pair_mask [B] (0 for padding pairs); token_sums [B, 2] is
    the summed completion log-probability (for the SFT term, a token mean over chosen tokens).
    Returns (objective_sum, sums) where sums holds pair sums plus `pairs`, `sft_tokens`.
    """
    valid, num_pairs, chosen_tokens = pair_weights(counts, pair_mask)
    chosen, rejected = logps[:, 0], logps[:, 1]
    losses, r_c, r_r = simpo_loss(chosen, rejected, beta=cfg.beta,
                                  gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                                  label_smoothing=cfg.label_smoothing)
    chosen_nll_sum = -(token_sums[:, 0] * valid).sum()
    sums = {
        "simpo_loss": (losses * valid).sum(),
        "rewards/chosen": (r_c * valid).sum(),
        "rewards/rejected": (r_r * valid).sum(),
        "rewards/accuracies": ((r_c > r_r) * valid).sum(),
        "rewards/margins": ((r_c - r_r) * valid).sum(),
        "logps/chosen": (jax.lax.stop_gradient(chosen) * valid).sum(),
        "logps/rejected": (jax.lax.stop_gradient(rejected) * valid).sum(),
        "logits/chosen": (mean_logits[:, 0] * valid).sum(),
        "logits/rejected": (mean_logits[:, 1] * valid).sum(),
        "sft_nll": jax.lax.stop_gradient(chosen_nll_sum),
        "pairs": num_pairs,
        "sft_tokens": chosen_tokens,
    }
    return sums, chosen_nll_sum, chosen_tokens


def finalize_metrics(sums, cfg: LossConfig):
    """Averages over the (global) batch from accumulated sums: the reference metric names."""
    pairs = jnp.maximum(sums["pairs"], 1.0)
    out = {k: sums[k] / pairs for k in PAIR_METRICS if k in sums}
    out["sft_loss"] = sums["sft_nll"] / jnp.maximum(sums["sft_tokens"], 1.0)
    out["loss"] = out["simpo_loss"] + cfg.sft_weight * out["sft_loss"]
    return out
