"""Schedules against transformers' schedulers step for step; the weight-decay mask."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from simpo_jax import optim


def cfg(kind, warmup_ratio=0.1, warmup_steps=0):
    return optim.OptimConfig(learning_rate=5e-7, lr_scheduler_type=kind, warmup_ratio=warmup_ratio,
                             warmup_steps=warmup_steps, weight_decay=0.0, adam_beta1=0.9,
                             adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                             master_weights="float32", optimizer_state_dtype="float32", seed=0)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup"])
@pytest.mark.parametrize("total,warmup_ratio,warmup_steps", [(1000, 0.1, 0), (37, 0.1, 0),
                                                             (200, 0.0, 15)])
def test_schedule_matches_transformers(kind, total, warmup_ratio, warmup_steps):
    c = cfg(kind, warmup_ratio, warmup_steps)
    # transformers 5 folds warmup_ratio into warmup_steps (a value < 1 is a ratio).
    args = transformers.TrainingArguments(output_dir="/tmp/unused", report_to=[],
                                          warmup_steps=warmup_steps or warmup_ratio)
    warmup = args.get_warmup_steps(total)
    assert optim.num_warmup_steps(c, total) == warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.learning_rate)
    sched = transformers.get_scheduler(kind, opt, num_warmup_steps=warmup,
                                       num_training_steps=total)
    ours = optim.make_schedule(c, total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = np.asarray([float(ours(s)) for s in range(total)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
    # The named points: start, end of warmup, middle, end.
    for s in (0, warmup, total // 2, total - 1):
        assert got[s] == pytest.approx(expected[s], rel=1e-5, abs=1e-12)


def test_updates_follow_the_schedule():
    # Adam on a constant gradient moves each weight by lr * sign(g): update k uses schedule(k).
    c = dataclasses.replace(cfg("linear", warmup_ratio=0.0, warmup_steps=3), learning_rate=1e-2)
    tx, schedule = optim.make_optimizer(c, total_steps=10)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(params)
    for k in range(8):
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(updates["w"], -float(schedule(k)) * np.sign(grads["w"]),
                                   rtol=1e-4, atol=1e-9)
    assert float(schedule(1)) < float(schedule(3)) > float(schedule(7)) > 0


def test_decay_mask_skips_norms_and_biases():
    params = {"model": {"norm": {"weight": jnp.ones(3)},
                        "layers": {"self_attn": {"q_proj": {"weight": jnp.ones((2, 3)),
                                                            "bias": jnp.ones(2)}},
                                   "input_layernorm": {"weight": jnp.ones(3)}},
                        "embed_tokens": {"weight": jnp.ones((5, 3))}}}
    mask = optim.decay_mask(params)
    assert mask["model"]["norm"]["weight"] is False
    assert mask["model"]["layers"]["input_layernorm"]["weight"] is False
    assert mask["model"]["layers"]["self_attn"]["q_proj"]["bias"] is False
    assert mask["model"]["layers"]["self_attn"]["q_proj"]["weight"] is True
    assert mask["model"]["embed_tokens"]["weight"] is True


def test_unknown_schedule_names_field():
    from configs import tiny
    from simpo_jax import config as config_lib

    c = tiny.get_config()
    c.lr_scheduler_type = "polynomial"  # the config schema refuses it, before any step
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        config_lib.validate(c)
