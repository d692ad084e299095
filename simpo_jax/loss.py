"""The SimPO objective and its family: completion log-probabilities, the losses and their metrics.

Shapes: B pairs, 2 sequences per pair (0 = chosen, 1 = rejected), T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

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


# --- Every preference method from the same inputs: summed log-probabilities and token counts ---


class PairLogps(NamedTuple):
    """[B] per pair: summed completion log-probs, scored-token counts, reference sums (or None)."""
    chosen: jax.Array
    rejected: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array
    ref_chosen: jax.Array | None = None
    ref_rejected: jax.Array | None = None

    def averages(self):
        """Mean log-prob per scored token; an empty side divides by 1 (its pair is masked, as in the step)."""
        return (self.chosen / jnp.maximum(self.chosen_tokens, 1.0),
                self.rejected / jnp.maximum(self.rejected_tokens, 1.0))

    def logratios(self):
        """Policy minus reference summed log-probs, chosen and rejected (DPO's implicit rewards / β)."""
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def average_logratios(self):
        """Log-ratios divided by the scored-token counts, as TRL's DPO ipo and sigmoid_norm do."""
        chosen, rejected = self.logratios()
        return (chosen / jnp.maximum(self.chosen_tokens, 1.0),
                rejected / jnp.maximum(self.rejected_tokens, 1.0))


def _smoothed_sigmoid_loss(logits, beta, label_smoothing):
    """-log σ(β·x)·(1-ε) - log σ(-β·x)·ε: the conservative logistic loss TRL's CPO uses."""
    return (-jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)


def _rewards(scale, chosen, rejected):
    """Logged rewards: scale times the per-side score, without gradient (TRL detaches them)."""
    return jax.lax.stop_gradient(scale * chosen), jax.lax.stop_gradient(scale * rejected)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's ORPO does to avoid cancellation."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def simpo_method(pair, *, beta, gamma_beta_ratio, loss_type="sigmoid", label_smoothing=0.0):
    """SimPO (arXiv 2405.14734): `simpo_loss` of the average log-probabilities."""
    chosen, rejected = pair.averages()
    return simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                      loss_type=loss_type, label_smoothing=label_smoothing)


def alphapo_method(pair, *, beta, gamma_beta_ratio, alphapo_alpha, label_smoothing=0.0):
    """AlphaPO (arXiv 2501.03884) as TRL CPOTrainer.cpo_loss with alpha set and loss_type="simpo".

    r = (1 - p^-α)/α with p = exp(avg_logp); loss = smoothed sigmoid of β·(r_w - r_l - γ/β);
    rewards β·r.
    """
    if alphapo_alpha == 0:
        raise ValueError("alphapo_alpha=0: that is SimPO's reward log p; use method='simpo', or a "
                         "non-zero alphapo_alpha (TRL's CPOConfig.alpha).")
    chosen, rejected = (-jnp.expm1(-alphapo_alpha * avg) / alphapo_alpha for avg in pair.averages())
    losses = _smoothed_sigmoid_loss(chosen - rejected - gamma_beta_ratio, beta, label_smoothing)
    return (losses, *_rewards(beta, chosen, rejected))


def cpo_method(pair, *, beta, label_smoothing=0.0):
    """CPO (arXiv 2401.08417, Eq. 3) as TRL CPOTrainer loss_type="sigmoid": summed log-probs.

    loss = smoothed sigmoid of β·(logp_w - logp_l); rewards β·logp. The NLL term is the step's SFT term.
    """
    losses = _smoothed_sigmoid_loss(pair.chosen - pair.rejected, beta, label_smoothing)
    return (losses, *_rewards(beta, pair.chosen, pair.rejected))


def ipo_free_method(pair, *, beta):
    """Reference-free IPO as TRL CPOTrainer loss_type="ipo" (IPO arXiv 2310.12036, Eq. 17).

    loss = (avg_logp_w - avg_logp_l - 1/(2β))²; rewards β·avg_logp.
    """
    chosen, rejected = pair.averages()
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return (losses, *_rewards(beta, chosen, rejected))


def orpo_method(pair, *, orpo_lambda):
    """ORPO (arXiv 2403.07691, Eqs. 4 and 7): minus TRL ORPOTrainer.odds_ratio_loss's `losses`.

    log_odds = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l)) on average log-probs a;
    loss = -λ·log σ(log_odds) (TRL subtracts its λ·log σ from the NLL); rewards λ·a.
    """
    chosen, rejected = pair.averages()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -orpo_lambda * jax.nn.log_sigmoid(log_odds)
    return (losses, *_rewards(orpo_lambda, chosen, rejected))


def dpo_method(pair, *, beta):
    """DPO (arXiv 2305.18290, Eq. 7) as TRL DPOTrainer loss_type="sigmoid".

    loss = -log σ(β·(Δ_w - Δ_l)), Δ = summed log-prob minus the reference's; rewards β·Δ.
    """
    chosen, rejected = pair.logratios()
    return (-jax.nn.log_sigmoid(beta * (chosen - rejected)), *_rewards(beta, chosen, rejected))


def ipo_method(pair, *, beta):
    """IPO (arXiv 2310.12036, Eq. 17) as TRL DPOTrainer loss_type="ipo".

    loss = (Δ_w/|y_w| - Δ_l/|y_l| - 1/(2β))² (TRL divides the log-ratios by the scored tokens);
    rewards β·Δ, not divided.
    """
    chosen, rejected = pair.average_logratios()
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return (losses, *_rewards(beta, *pair.logratios()))


def dpo_norm_method(pair, *, beta):
    """Length-normalised DPO as TRL DPOTrainer loss_type="sigmoid_norm".

    loss = -log σ(β·(Δ_w/|y_w| - Δ_l/|y_l|)); rewards β·Δ, not divided.
    """
    chosen, rejected = pair.average_logratios()
    return (-jax.nn.log_sigmoid(beta * (chosen - rejected)), *_rewards(beta, *pair.logratios()))


def rdpo_method(pair, *, beta, rdpo_alpha):
    """R-DPO (arXiv 2403.19159, length-regularised DPO; TRL has none): from the paper.

    loss = -log σ(β·(Δ_w - Δ_l) + α·(|y_w| - |y_l|)) (as the SimPO paper's table of objectives
    writes it), |y| the scored tokens; rewards β·Δ as DPO's.
    """
    chosen, rejected = pair.logratios()
    length_term = rdpo_alpha * (pair.chosen_tokens - pair.rejected_tokens)
    losses = -jax.nn.log_sigmoid(beta * (chosen - rejected) + length_term)
    return (losses, *_rewards(beta, chosen, rejected))


def simper_method(pair):
    """SimPER (arXiv 2502.00883): no β, no γ, no reference.

    loss = -exp(avg_logp_w) + exp(avg_logp_l) (minus the chosen inverse perplexity plus the rejected
    one); rewards avg_logp (β = 1).
    """
    chosen, rejected = pair.averages()
    return (-jnp.exp(chosen) + jnp.exp(rejected), *_rewards(1.0, chosen, rejected))


def repo_method(pair, *, gamma):
    """RePO (arXiv 2503.07426): SimPO's β → ∞ limit (of SimPO/β), a ReLU max-margin loss.

    loss = max(0, γ - (avg_logp_w - avg_logp_l)); γ is the margin in average log-prob units
    (SimPO's γ/β); rewards avg_logp (β = 1).
    """
    chosen, rejected = pair.averages()
    return (jax.nn.relu(gamma - (chosen - rejected)), *_rewards(1.0, chosen, rejected))


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of METHODS: the per-pair loss, whether it reads reference sums, the hyperparameters it
    requires and those it may read (their defaults are in the loss function's signature)."""
    loss: Callable
    needs_reference: bool
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


# `gamma` (an absolute margin, TRL's simpo_gamma) may replace `gamma_beta_ratio` wherever that is read.
METHODS = {
    "simpo": Method(simpo_method, False, ("beta", "gamma_beta_ratio"), ("loss_type", "label_smoothing")),
    "alphapo": Method(alphapo_method, False, ("beta", "gamma_beta_ratio", "alphapo_alpha"),
                      ("label_smoothing",)),
    "cpo": Method(cpo_method, False, ("beta",), ("label_smoothing",)),
    "ipo_free": Method(ipo_free_method, False, ("beta",)),
    "orpo": Method(orpo_method, False, ("orpo_lambda",)),
    "dpo": Method(dpo_method, True, ("beta",)),
    "ipo": Method(ipo_method, True, ("beta",)),
    "dpo_norm": Method(dpo_norm_method, True, ("beta",)),
    "rdpo": Method(rdpo_method, True, ("beta", "rdpo_alpha")),
    "simper": Method(simper_method, False),
    "repo": Method(repo_method, False, ("gamma",)),
}


def _margin_as_ratio(method: str, hyperparameters: dict) -> dict:
    """Replaces an absolute `gamma` by `gamma_beta_ratio` = gamma / beta for methods that read the ratio."""
    if "gamma_beta_ratio" not in METHODS[method].required or "gamma" not in hyperparameters:
        return hyperparameters
    if "gamma_beta_ratio" in hyperparameters:
        raise ValueError(f"method={method!r}: both gamma={hyperparameters['gamma']} and "
                         f"gamma_beta_ratio={hyperparameters['gamma_beta_ratio']} are set; set one: "
                         "gamma is the absolute margin (TRL's simpo_gamma), gamma_beta_ratio = gamma / beta.")
    if "beta" not in hyperparameters:
        return hyperparameters  # the missing beta is reported by the caller's check
    out = {k: v for k, v in hyperparameters.items() if k != "gamma"}
    out["gamma_beta_ratio"] = hyperparameters["gamma"] / hyperparameters["beta"]
    return out


def preference_loss(method, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *,
                    ref_chosen_logps=None, ref_rejected_logps=None, **hyperparameters):
    """Per-pair (losses, chosen_rewards, rejected_rewards) of `method` from summed log-probabilities.

    chosen_logps, rejected_logps: [B] log-probabilities summed over each completion's scored tokens;
    chosen_tokens, rejected_tokens: [B] their counts; ref_*: the reference model's sums, for the
    methods in METHODS that need one. Losses hold the preference term only (CPO's and ORPO's NLL
    term is the step's SFT term); rewards carry no gradient. Computes in the inputs' float dtype,
    at least float32.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {tuple(METHODS)}.")
    spec = METHODS[method]
    hyperparameters = _margin_as_ratio(method, hyperparameters)
    reads_ratio = "gamma_beta_ratio" in spec.required
    readable = spec.required + spec.optional + (("gamma",) if reads_ratio else ())
    unknown = sorted(set(hyperparameters) - set(readable))
    given = set(hyperparameters) | ({"gamma_beta_ratio"} if "gamma" in hyperparameters else set())
    missing = [name for name in spec.required if name not in given]
    if unknown or missing:
        problem = " and ".join(f"{word} {names}" for word, names in (("unknown", unknown),
                                                                     ("missing", missing)) if names)
        either = " (gamma may replace gamma_beta_ratio)" if reads_ratio else ""
        raise ValueError(f"method={method!r}: {problem} hyperparameters; it reads required "
                         f"{list(spec.required)}, optional {list(spec.optional)}{either}.")
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"method={method!r} needs reference log-probabilities: pass ref_chosen_logps and "
                         "ref_rejected_logps (summed over the same scored tokens), or use a reference-free "
                         f"method: {tuple(m for m, s in METHODS.items() if not s.needs_reference)}.")
    dtype = jnp.promote_types(jnp.result_type(chosen_logps), jnp.float32)
    arrays = [None if a is None else jnp.asarray(a, dtype) for a in
              (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps,
               ref_rejected_logps)]
    return spec.loss(PairLogps(*arrays), **hyperparameters)
