"""The hyperparameter doctor: start-up warnings, advice triggers (once each), NaN stops."""

import os
import sys

import jax
import numpy as np
import pytest

from simpo_jax import doctor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config(**overrides):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import base

    c = base.get_config()
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def warnings_for(num_params=7e9, effective_batch=128, **overrides):
    return doctor.config_warnings(base_config(**overrides), num_params=num_params,
                                  effective_batch=effective_batch)


def test_defaults_for_a_7b_model_are_clean():
    assert warnings_for() == []


@pytest.mark.parametrize("overrides,needle", [
    (dict(beta=0.1), "beta=0.1 is DPO-like"),
    (dict(beta=12.0), "beta=12.0 is above"),
    (dict(gamma_beta_ratio=1.5), "gamma_beta_ratio=1.5"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing=0.1"),
    (dict(sft_weight=0.5), "sft_weight=0.5"),
    (dict(learning_rate=1e-6), "learning_rate=1e-06 is above the guide's row for 7B-8B"),
])
def test_each_warning(overrides, needle):
    found = warnings_for(**overrides)
    assert len(found) == 1 and needle in found[0], found


def test_learning_rate_rows_and_batch_range():
    assert "70B+" in warnings_for(num_params=70e9, learning_rate=3e-7, effective_batch=64)[0]
    assert warnings_for(num_params=2e9, learning_rate=1e-6) == []
    assert warnings_for(num_params=20e6, learning_rate=1e-3, effective_batch=16) == []  # tiny
    far = warnings_for(effective_batch=16)
    assert len(far) == 1 and "effective batch 16" in far[0] and "128-256" in far[0]


def stream(n, **values):
    return [{k: (v(i) if callable(v) else v) for k, v in values.items()} for i in range(n)]


HEALTHY = dict(loss=lambda i: 1.0 - 0.01 * i, **{"rewards/margins": 1.5, "logps/chosen": -1.5,
                                                   "logps/rejected": -3.0})


def feed(rows):
    advisor = doctor.Advisor()
    advice = []
    for i, row in enumerate(rows):
        advice += advisor.observe(i, row)
    return advice


def test_healthy_stream_gives_no_advice():
    assert feed(stream(100, **HEALTHY)) == []


@pytest.mark.parametrize("change,needle", [
    (dict(loss=lambda i: 0.5 + 0.02 * i), "loss is rising"),
    ({"rewards/margins": 0.2}, "not being learned"),
    ({"rewards/margins": 7.0}, "overfitting"),
    ({"logps/chosen": -12.0, "logps/rejected": -14.0}, "not learning"),
    ({"logps/chosen": 0.5, "logps/rejected": 0.2}, "numerical instability"),
])
def test_each_trigger_fires_once(change, needle):
    advice = feed(stream(100, **{**HEALTHY, **change}))
    assert len(advice) == 1 and needle in advice[0], advice


def test_advice_survives_resume():
    a = doctor.Advisor()
    for i, row in enumerate(stream(40, **{**HEALTHY, "rewards/margins": 0.1})):
        a.observe(i, row)
    b = doctor.Advisor()
    b.load_state_dict(a.state_dict())
    assert all(not b.observe(i, row) for i, row in
               enumerate(stream(40, **{**HEALTHY, "rewards/margins": 0.1})))


@pytest.mark.slow
def test_nan_stops_the_run_without_a_bad_checkpoint(tmp_path):
    from configs import tiny
    from simpo_jax import build, train

    c = tiny.get_config()
    c.output_dir = str(tmp_path)
    c.per_device_train_batch_size = 2
    c.learning_rate = 1e12  # diverges within a few steps
    c.max_grad_norm = 0.0
    c.warmup_ratio = 0.0
    c.lr_scheduler_type = "constant_with_warmup"
    c.max_steps, c.save_steps, c.eval_steps, c.logging_steps = 40, 1, 1000, 1
    c.lock()
    with pytest.raises(FloatingPointError, match="not finite.*Lower learning_rate"):
        train.train(c)
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved, "checkpoints before the divergence are kept"
    run = build.build(c, with_data=False)  # restores the latest checkpoint
    run.checkpointer.close()
    assert run.start_step == saved[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.state.params))
