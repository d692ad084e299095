"""loss.preference_loss for every method: against TRL's own loss code (float64), and the papers'
formulas worked by hand where TRL has none (SimPER, RePO, R-DPO)."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from simpo_jax import loss as loss_lib

ATOL = 1e-5  # the bound on losses and rewards against TRL, float64 inputs


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_pairs(seed=0, n=24):
    """Summed log-probs and token counts: short (1-3) and long (512-2048) completions, ties."""
    rng = np.random.default_rng(seed)
    lengths = np.array([1, 2, 3, 17, 64, 512, 2048])
    chosen_tokens = rng.choice(lengths, n).astype(np.float64)
    rejected_tokens = rng.choice(lengths, n).astype(np.float64)
    chosen = rng.uniform(-4.0, -0.05, n) * chosen_tokens
    rejected = rng.uniform(-4.0, -0.05, n) * rejected_tokens
    ref_chosen = chosen + rng.normal(0.0, 3.0, n)
    ref_rejected = rejected + rng.normal(0.0, 3.0, n)
    # pair 0: chosen and rejected tie exactly; pair 1: the policy equals its reference.
    rejected[0], rejected_tokens[0] = chosen[0], chosen_tokens[0]
    ref_rejected[0] = ref_chosen[0]
    ref_chosen[1], ref_rejected[1] = chosen[1], rejected[1]
    return dict(chosen=chosen, rejected=rejected, chosen_tokens=chosen_tokens,
                rejected_tokens=rejected_tokens, ref_chosen=ref_chosen, ref_rejected=ref_rejected)


def ours(method, p, **hyperparameters):
    out = loss_lib.preference_loss(method, p["chosen"], p["rejected"], p["chosen_tokens"],
                                   p["rejected_tokens"], ref_chosen_logps=p["ref_chosen"],
                                   ref_rejected_logps=p["ref_rejected"], **hyperparameters)
    assert all(a.dtype == jnp.float64 for a in out)
    return [np.asarray(a) for a in out]


def assert_matches(got, want):
    for name, g, w in zip(("losses", "chosen_rewards", "rejected_rewards"), got, want):
        np.testing.assert_allclose(g, np.asarray(w, np.float64), rtol=0, atol=ATOL, err_msg=name)


def trl_cpo(chosen, rejected, *, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0):
    """CPOTrainer.cpo_loss bound to an object holding just the attributes it reads."""
    trainer = types.SimpleNamespace(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                    simpo_gamma=simpo_gamma, alpha=alpha,
                                    accelerator=types.SimpleNamespace(device="cpu"))
    return CPOTrainer.cpo_loss(trainer, torch.tensor(chosen), torch.tensor(rejected))


def averages(p):
    # TRL's get_batch_logps(average_log_prob=True): the sum over the scored tokens / their count.
    return p["chosen"] / p["chosen_tokens"], p["rejected"] / p["rejected_tokens"]


@pytest.mark.parametrize("method,hyperparameters,trl_kwargs,averaged", [
    # TRL's CPO feeds average log-probs only to loss_type "ipo" and "simpo" (alphapo is simpo).
    ("simpo", dict(beta=2.0, gamma_beta_ratio=0.5), dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0), True),
    ("simpo", dict(beta=2.5, gamma=1.375, label_smoothing=0.1),
     dict(loss_type="simpo", beta=2.5, simpo_gamma=1.375, label_smoothing=0.1), True),
    ("alphapo", dict(beta=2.5, gamma=1.0, alphapo_alpha=0.25),
     dict(loss_type="simpo", beta=2.5, simpo_gamma=1.0, alpha=0.25), True),
    ("alphapo", dict(beta=10.0, gamma_beta_ratio=0.3, alphapo_alpha=-0.1, label_smoothing=0.2),
     dict(loss_type="simpo", beta=10.0, simpo_gamma=3.0, alpha=-0.1, label_smoothing=0.2), True),
    ("cpo", dict(beta=0.1), dict(loss_type="sigmoid", beta=0.1), False),
    ("cpo", dict(beta=0.05, label_smoothing=0.2), dict(loss_type="sigmoid", beta=0.05, label_smoothing=0.2),
     False),
    ("ipo_free", dict(beta=0.1), dict(loss_type="ipo", beta=0.1), True),
    ("ipo_free", dict(beta=1.5), dict(loss_type="ipo", beta=1.5), True),
])
def test_cpo_trainer_methods_equal_trl(x64, method, hyperparameters, trl_kwargs, averaged):
    p = make_pairs()
    chosen, rejected = averages(p) if averaged else (p["chosen"], p["rejected"])
    assert_matches(ours(method, p, **hyperparameters), trl_cpo(chosen, rejected, **trl_kwargs))


@pytest.mark.parametrize("orpo_lambda", [0.1, 0.25])
def test_orpo_equals_minus_trl_odds_ratio_term(x64, orpo_lambda):
    p = make_pairs(1)
    trainer = types.SimpleNamespace(beta=orpo_lambda, accelerator=types.SimpleNamespace(device="cpu"))
    chosen, rejected = averages(p)
    losses, rc, rr, _, _ = ORPOTrainer.odds_ratio_loss(trainer, torch.tensor(chosen), torch.tensor(rejected))
    # ORPOTrainer: loss = policy_nll_loss - losses.mean(), so the preference term is -losses.
    assert_matches(ours("orpo", p, orpo_lambda=orpo_lambda), (-losses, rc, rr))


class _FixedLogProbs:
    """Stands in for the model DPOTrainer calls: per-token log-probs that sum to given values."""
    training = True

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **_):
        zeros = torch.zeros_like(self.per_token)
        return types.SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool())


def trl_dpo_pair(loss_type, beta, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen,
                 ref_rejected, prompt=2):
    """DPOTrainer._compute_loss on one pair (it returns a batch mean): its loss and logged rewards."""
    counts = (int(chosen_tokens), int(rejected_tokens))
    width = prompt + max(counts)
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    for row, count in enumerate(counts):
        completion_mask[row, prompt:prompt + count] = 1
    shifted = completion_mask[:, 1:].double()
    per_token = shifted * torch.tensor([chosen / counts[0], rejected / counts[1]])[:, None]
    metrics = {"train": collections.defaultdict(list)}
    identity = lambda x: x  # noqa: E731 (one process: gather is the identity)
    trainer = types.SimpleNamespace(
        model=_FixedLogProbs(per_token), ld_alpha=None, aux_loss_enabled=False, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        use_weighting=False, label_smoothing=0.0, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
        accelerator=types.SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity))
    inputs = {"input_ids": torch.ones(2, width, dtype=torch.long), "attention_mask": torch.ones(2, width),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor([ref_chosen]),
              "ref_rejected_logps": torch.tensor([ref_rejected])}
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return float(loss), metrics["train"]["rewards/chosen"][0], metrics["train"]["rewards/rejected"][0]


@pytest.mark.parametrize("method,trl_loss_type", [("dpo", "sigmoid"), ("ipo", "ipo"),
                                                  ("dpo_norm", "sigmoid_norm")])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_trainer_methods_equal_trl(x64, method, trl_loss_type, beta):
    p = make_pairs(2, n=12)
    keys = ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "ref_chosen", "ref_rejected")
    want = np.array([trl_dpo_pair(trl_loss_type, beta, *(p[k][i] for k in keys))
                     for i in range(len(p["chosen"]))])
    assert_matches(ours(method, p, beta=beta), want.T)


@pytest.mark.parametrize("hyperparameters", [dict(loss_type="sigmoid", label_smoothing=0.0),
                                             dict(loss_type="sigmoid", label_smoothing=0.2),
                                             dict(loss_type="hinge", label_smoothing=0.0)])
def test_simpo_is_todays_simpo_loss_exactly(hyperparameters):
    p = {k: jnp.asarray(v, jnp.float32) for k, v in make_pairs(3).items()}
    got = loss_lib.preference_loss("simpo", p["chosen"], p["rejected"], p["chosen_tokens"],
                                   p["rejected_tokens"], beta=2.5, gamma_beta_ratio=0.55, **hyperparameters)
    want = loss_lib.simpo_loss(p["chosen"] / p["chosen_tokens"], p["rejected"] / p["rejected_tokens"],
                               beta=2.5, gamma_beta_ratio=0.55, **hyperparameters)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def hand_pairs():
    # chosen / rejected sums over their token counts -> averages:
    #   pair 0: -2.0/4 = -0.5  vs  -6.0/3 = -2.0
    #   pair 1: -9.0/6 = -1.5  vs  -5.0/4 = -1.25
    #   pair 2: -3.0/3 = -1.0  vs  -2.6/2 = -1.3
    return [jnp.array(v, jnp.float32) for v in ([-2.0, -9.0, -3.0], [-6.0, -5.0, -2.6],
                                                  [4, 6, 3], [3, 4, 2])]


def test_simper_worked_from_the_paper():
    # SimPER (arXiv 2502.00883): loss = -exp(avg_w) + exp(avg_l).
    #   pair 0: -exp(-0.5) + exp(-2.0)  = -0.60653066 + 0.13533528 = -0.47119538
    #   pair 1: -exp(-1.5) + exp(-1.25) = -0.22313016 + 0.28650480 =  0.06337464
    #   pair 2: -exp(-1.0) + exp(-1.3)  = -0.36787944 + 0.27253179 = -0.09534765
    losses, rc, rr = loss_lib.preference_loss("simper", *hand_pairs())
    np.testing.assert_allclose(losses, [-0.47119538, 0.06337464, -0.09534765], atol=1e-7)
    np.testing.assert_allclose(rc, [-0.5, -1.5, -1.0], atol=1e-7)
    np.testing.assert_allclose(rr, [-2.0, -1.25, -1.3], atol=1e-7)


def test_repo_worked_from_the_paper():
    # RePO (arXiv 2503.07426): loss = max(0, γ - (avg_w - avg_l)), γ = 0.5.
    #   pair 0: margin -0.5 - -2.0 = 1.5  -> max(0, 0.5 - 1.5) = 0
    #   pair 1: margin -1.5 - -1.25 = -0.25 -> 0.5 + 0.25 = 0.75
    #   pair 2: margin -1.0 - -1.3 = 0.3  -> 0.5 - 0.3 = 0.2
    losses, rc, rr = loss_lib.preference_loss("repo", *hand_pairs(), gamma=0.5)
    np.testing.assert_allclose(losses, [0.0, 0.75, 0.2], atol=1e-6)
    np.testing.assert_allclose(rc, [-0.5, -1.5, -1.0], atol=1e-7)


def test_repo_is_simpo_over_beta_as_beta_grows(x64):
    # The paper's claim: RePO is SimPO's β -> ∞ limit. SimPO/β -> max(0, γ/β - margin), so RePO's γ
    # is SimPO's γ/β.
    p = make_pairs(4)
    repo = ours("repo", p, gamma=0.4)[0]
    beta = 1e5
    simpo = ours("simpo", p, beta=beta, gamma_beta_ratio=0.4)[0] / beta
    np.testing.assert_allclose(simpo, repo, atol=1e-5)


def test_rdpo_worked_from_the_paper():
    # R-DPO (arXiv 2403.19159): loss = -log σ(β(Δ_w - Δ_l) + α(|y_w| - |y_l|)), β = 0.1, α = 0.01.
    #   Δ_w = -40 - -42 = 2 (20 tokens); Δ_l = -30 - -29 = -1 (10 tokens)
    #   z = 0.1·3 + 0.01·10 = 0.4; loss = log(1 + e^-0.4) = log(1.67032005) = 0.51301525
    #   rewards β·Δ: 0.2 and -0.1
    losses, rc, rr = loss_lib.preference_loss(
        "rdpo", jnp.array([-40.0]), jnp.array([-30.0]), jnp.array([20]), jnp.array([10]),
        ref_chosen_logps=jnp.array([-42.0]), ref_rejected_logps=jnp.array([-29.0]), beta=0.1, rdpo_alpha=0.01)
    np.testing.assert_allclose([losses[0], rc[0], rr[0]], [0.51301525, 0.2, -0.1], atol=1e-6)


def test_rdpo_without_length_term_is_dpo(x64):
    p = make_pairs(5)
    for got, want in zip(ours("rdpo", p, beta=0.1, rdpo_alpha=0.0), ours("dpo", p, beta=0.1)):
        np.testing.assert_array_equal(got, want)


ALL_METHODS = {
    "simpo": dict(beta=2.0, gamma_beta_ratio=0.5), "alphapo": dict(beta=2.0, gamma=1.0, alphapo_alpha=0.25),
    "cpo": dict(beta=0.1), "ipo_free": dict(beta=0.1), "orpo": dict(orpo_lambda=0.1), "dpo": dict(beta=0.1),
    "ipo": dict(beta=0.1), "dpo_norm": dict(beta=0.1), "rdpo": dict(beta=0.1, rdpo_alpha=0.01),
    "simper": {}, "repo": dict(gamma=0.5),
}


def test_every_method_is_tested_and_keeps_float32_and_rewards_have_no_gradient():
    assert set(ALL_METHODS) == set(loss_lib.METHODS)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in make_pairs(6, n=4).items()}
    for method, hyperparameters in ALL_METHODS.items():
        def rewards_sum(chosen, rejected):
            _, rc, rr = loss_lib.preference_loss(
                method, chosen, rejected, p["chosen_tokens"], p["rejected_tokens"],
                ref_chosen_logps=p["ref_chosen"], ref_rejected_logps=p["ref_rejected"], **hyperparameters)
            return (rc + rr).sum()
        out = loss_lib.preference_loss(method, p["chosen"], p["rejected"], p["chosen_tokens"],
                                       p["rejected_tokens"], ref_chosen_logps=p["ref_chosen"],
                                       ref_rejected_logps=p["ref_rejected"], **hyperparameters)
        assert all(a.dtype == jnp.float32 and np.isfinite(a).all() for a in out), method
        grads = jax.grad(rewards_sum, argnums=(0, 1))(p["chosen"], p["rejected"])
        assert all(np.all(np.asarray(g) == 0) for g in grads), method


def call(method, ref=False, **hyperparameters):
    one = jnp.array([-1.0])
    refs = dict(ref_chosen_logps=one, ref_rejected_logps=one) if ref else {}
    return loss_lib.preference_loss(method, one, one, jnp.array([1]), jnp.array([1]), **refs,
                                    **hyperparameters)


def test_errors_name_the_problem_and_what_is_valid():
    with pytest.raises(ValueError, match=r"both gamma=1.0 and gamma_beta_ratio=0.5"):
        call("simpo", beta=2.0, gamma=1.0, gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match=r"method='kto': must be one of \('simpo', 'alphapo'"):
        call("kto", beta=0.1)
    with pytest.raises(ValueError, match=r"method='dpo' needs reference log-probabilities.*'simpo'"):
        call("dpo", beta=0.1)
    with pytest.raises(ValueError, match=r"unknown \['label_smoothing'\].*required \['beta'\]"):
        call("dpo", ref=True, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"missing \['alphapo_alpha'\]"):
        call("alphapo", beta=2.0, gamma=1.0)
    with pytest.raises(ValueError, match=r"missing \['beta'\]"):
        call("simpo", gamma=1.0)
    with pytest.raises(ValueError, match=r"unknown \['gamma_beta_ratio'\].*required \['gamma'\]"):
        call("repo", gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match=r"alphapo_alpha=0.*method='simpo'"):
        call("alphapo", beta=2.0, gamma=1.0, alphapo_alpha=0.0)
