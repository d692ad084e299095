"""SimPO loss against the seed documents' worked examples and a float64 NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import step as step_lib
from simpo_jax.data.batch import PaddedBatch


def np_simpo(c, r, beta, gbr, loss_type, eps):
    z = np.asarray(c, np.float64) - np.asarray(r, np.float64) - gbr
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - beta * z)
    log_sig = lambda x: -np.logaddexp(0.0, -x)
    return -log_sig(beta * z) * (1 - eps) - log_sig(-beta * z) * eps


def test_seed_worked_example_sigmoid():
    # ../shared/seeds/002: logps -1.2 and -2.5, beta 2.0, gamma/beta 0.5 -> loss 0.184 (0.1839).
    losses, rc, rr = loss_lib.simpo_loss(jnp.array([-1.2]), jnp.array([-2.5]), beta=2.0,
                                         gamma_beta_ratio=0.5)
    assert float(losses[0]) == pytest.approx(0.1839, abs=5e-5)
    assert float(rc[0]) == pytest.approx(-2.4) and float(rr[0]) == pytest.approx(-5.0)


def test_seed_worked_example_sft():
    # The seed's SFT example: simpo 0.184 + 0.1 * sft (= -chosen avg logp = 1.2) = 0.304. Its
    # simpo term is the beta=2.0 value of example 1 (the text says beta 2.5, which would give 0.127).
    cfg = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1)
    logps = jnp.array([[-1.2, -2.5]])
    counts = jnp.array([[4.0, 6.0]])
    sums, _, _ = loss_lib.pair_metric_sums(logps, counts, jnp.zeros((1, 2)), jnp.ones(1),
                                           logps * counts, cfg)
    m = loss_lib.finalize_metrics(sums, cfg)
    assert float(m["sft_loss"]) == pytest.approx(1.2, abs=1e-6)
    assert float(m["loss"]) == pytest.approx(0.304, abs=5e-4)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3),
                                           ("hinge", 0.0)])
def test_against_float64_reference(loss_type, eps):
    rng = np.random.default_rng(0)
    c, r = rng.normal(-2, 1, 64), rng.normal(-2.5, 1, 64)
    for beta, gbr in [(2.0, 0.5), (2.5, 0.3), (10.0, 1.0)]:
        got, _, _ = loss_lib.simpo_loss(jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32),
                                        beta=beta, gamma_beta_ratio=gbr, loss_type=loss_type,
                                        label_smoothing=eps)
        np.testing.assert_allclose(np.asarray(got), np_simpo(c, r, beta, gbr, loss_type, eps),
                                   rtol=1e-5, atol=1e-6)


def test_hinge_rejects_label_smoothing():
    from configs import tiny
    from simpo_jax import config as config_lib

    c = tiny.get_config()
    c.loss_type, c.label_smoothing = "hinge", 0.1  # the config schema refuses it, before any step
    with pytest.raises(ValueError, match="label_smoothing"):
        config_lib.validate(c)


def test_rewards_have_no_gradient():
    def f(c):
        _, rc, _ = loss_lib.simpo_loss(c, jnp.zeros(2), beta=2.0, gamma_beta_ratio=0.5)
        return rc.sum()
    assert np.all(np.asarray(jax.grad(f)(jnp.ones(2))) == 0)


def test_completion_mask_from_positions_not_ids():
    # pad id equals EOS (id 2): the EOS that ends the completion is scored, the pads are not.
    ids = jnp.array([[1, 5, 6, 7, 2, 2, 2, 2]])
    start, length = jnp.array([2]), jnp.array([5])
    mask = loss_lib.completion_mask(start, length, ids.shape[-1])
    # targets are tokens 1..7; scored tokens are indices 2, 3, 4 -> targets positions 1, 2, 3
    assert mask.tolist() == [[False, True, True, True, False, False, False]]


def test_empty_completion_gives_no_nan():
    # The train step's per-sequence statistics, with a zero LM head: every logit is 0.
    model = models.from_config(dict(model_type="llama", vocab_size=11, hidden_size=8,
                                    intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=16, tie_word_embeddings=False))
    model.lm_head.weight[...] = jnp.zeros_like(model.lm_head.weight[...])
    graphdef, params = nnx.split(model, nnx.Param)
    batch = PaddedBatch(input_ids=jnp.array([[[1, 3, 4, 2, 0, 0], [1, 3, 4, 0, 0, 0]]]),
                        completion_start=jnp.array([[3, 3]]), lengths=jnp.array([[4, 3]]),
                        pair_mask=jnp.ones(1))
    stats = jax.jit(step_lib.pair_stats, static_argnums=0)  # compiled once, not op by op
    logps, count, mean_logits, _, _ = stats(graphdef, params, batch)
    logps, count = logps[0], count[0]
    assert np.isfinite(np.asarray(logps)).all()
    assert count.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(float(logps[0]), -np.log(11), rtol=1e-6)
    assert mean_logits.tolist() == [[0.0, 0.0]]
    cfg = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5)
    sums, _, _ = loss_lib.pair_metric_sums(logps.reshape(1, 2), count.reshape(1, 2),
                                           jnp.zeros((1, 2)), jnp.ones(1),
                                           (logps * count).reshape(1, 2), cfg)
    m = loss_lib.finalize_metrics(sums, cfg)
    assert float(sums["pairs"]) == 0.0 and all(np.isfinite(float(v)) for v in m.values())


def test_empty_prompt_first_token_is_not_scored():
    # Token 0 has no predictor: with an empty prompt a one-token completion scores nothing, so the
    # pair does not count, in the loss or in the denominators (pair_weights serves both).
    mask = loss_lib.completion_mask(jnp.array([0, 0, 2]), jnp.array([1, 3, 4]), 5)
    assert mask.astype(int).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]
    counts = mask.sum(-1).astype(jnp.float32)
    valid, pairs, tokens = loss_lib.pair_weights(jnp.stack([counts[:2], counts[1:]]),
                                                 jnp.array([1.0, 1.0]))
    assert valid.tolist() == [0.0, 1.0] and float(pairs) == 1.0 and float(tokens) == 2.0
    _, pairs, _ = loss_lib.pair_weights(jnp.array([[2.0, 3.0]]), jnp.array([0.0]))
    assert float(pairs) == 0.0  # a padding pair never counts


def test_tied_rewards_are_not_accurate():
    # TRL's rewards/accuracies is chosen_rewards > rejected_rewards: a tie is not a win.
    cfg = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5)
    logps = jnp.array([[-1.0, -1.0], [-1.0, -2.0]])
    counts = jnp.full((2, 2), 3.0)
    sums, _, _ = loss_lib.pair_metric_sums(logps, counts, jnp.zeros((2, 2)), jnp.ones(2),
                                           logps * counts, cfg)
    assert float(loss_lib.finalize_metrics(sums, cfg)["rewards/accuracies"]) == 0.5


def test_loss_config_reads_every_field():
    from configs import tiny

    c = tiny.get_config()
    c.beta, c.gamma_beta_ratio, c.loss_type, c.label_smoothing, c.sft_weight = (
        2.5, 0.3, "sigmoid", 0.1, 0.25)
    got = dataclasses.asdict(loss_lib.LossConfig.from_config(c))
    assert got == {k: c[k] for k in got}
