"""The hyperparameter doctor: start-up warnings, advice triggers (once each), NaN stops."""

import glob
import os
import re
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


@pytest.mark.parametrize("num_params,row", [
    (6.91e9, "7B-8B"),  # DeepSeek-Math-7B: a 7B-class model (6.5e9-7.5e9)
    (6.5e9, "7B-8B"), (7.24e9, "7B-8B"), (8.03e9, "7B-8B"),  # Mistral-7B, Llama-3-8B
    (9.24e9, None),  # Gemma-2-9B: between the guide's rows
    (6.4e9, None), (3.21e9, "1B-3B"), (1.24e9, "1B-3B"), (0.1e9, None),
    (13.0e9, "13B-30B"), (68.98e9, "70B+"),  # Llama-2-70B
])
def test_size_bands(num_params, row):
    found = doctor.size_row(num_params)
    assert (found[0] if found else None) == row
    lr_warned = any("learning_rate" in w for w in warnings_for(num_params=num_params,
                                                                 learning_rate=2e-6))
    assert lr_warned == (row is not None)


# Parameter counts of the recipes' models (tests/test_plan.py checks the shipped configs give them).
RECIPE_SIZES = {"mistral7b": 7.24e9, "llama3_8b_instruct": 8.03e9, "gemma2_9b": 9.24e9,
                "deepseek_math_7b": 6.91e9, "zephyr7b": 7.24e9}


@pytest.mark.parametrize("name", sorted(RECIPE_SIZES))
def test_recipes_pass_their_own_doctor_on_8_devices(name):
    c = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    batch = c.per_device_train_batch_size * 8 * c.gradient_accumulation_steps
    assert doctor.config_warnings(c, num_params=RECIPE_SIZES[name], effective_batch=batch) == []


def test_divergence_advice_speaks_to_the_model_at_hand():
    tiny = doctor.divergence_advice(learning_rate=1e-3, beta=2.0, num_params=2e5)
    assert "0.001 -> 0.0005" in tiny and "2 -> 1" in tiny
    assert "7B" not in tiny and "e-07" not in tiny
    seven = doctor.divergence_advice(learning_rate=5e-7, beta=2.0, num_params=7.2e9)
    assert "5e-07 -> 2.5e-07" in seven and "7B-8B models is 3e-07 to 5e-07" in seven
    unknown = doctor.divergence_advice()
    assert "halve" in unknown and "7B" not in unknown
    advisor = doctor.Advisor(learning_rate=1e-3, beta=2.0, num_params=2e5)
    rising = [dict(HEALTHY, loss=0.5 + 0.02 * i) for i in range(40)]
    advice = [a for i, row in enumerate(rising) for a in advisor.observe(i, row)]
    assert len(advice) == 1 and "0.001 -> 0.0005" in advice[0] and "7B" not in advice[0]
    message = advisor.nan_message(3, {"loss": float("nan"), "grad_norm": 1.0})
    assert "Lower learning_rate (e.g. 0.001 -> 0.0005" in message and "7B" not in message


def test_advice_names_published_sources_not_local_folders():
    texts = list(doctor.config_warnings(base_config(beta=0.1, sft_weight=0.5), num_params=7e9,
                                        effective_batch=16))
    for change in ({"rewards/margins": 0.2}, {"rewards/margins": 7.0},
                   {"logps/chosen": -12.0, "logps/rejected": -14.0},
                   {"logps/chosen": 0.5, "logps/rejected": 0.2},
                   {"loss": lambda i: 0.5 + 0.02 * i}):
        texts += feed(stream(100, **{**HEALTHY, **change}))
    assert len(texts) == 8
    for text in texts:
        assert "seeds" not in text and "shared" not in text and "/" not in text.split("(")[-1]
        assert "SimPO" in text.split("(")[-1], text


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

    def config(learning_rate, max_steps):
        c = tiny.get_config()
        c.output_dir = str(tmp_path)
        c.per_device_train_batch_size = 2
        c.learning_rate = learning_rate
        c.max_grad_norm = 0.0
        c.warmup_ratio = 0.0
        c.lr_scheduler_type = "constant_with_warmup"
        c.max_steps, c.save_steps, c.eval_steps, c.logging_steps = max_steps, 1, 1000, 1
        c.lock()
        return c

    from simpo_jax.health import RunUnhealthy

    train.train(config(3e-4, 3))  # healthy steps first; then a resume that diverges at once:
    with pytest.raises(RunUnhealthy, match="not finite.*Lower learning_rate"):
        train.train(config(1e12, 40))  # the first update ruins the state (issue 26: 1e30)
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and saved[-1] == 3, "checkpoints before the divergence are kept"
    run = build.build(config(1e12, 40), with_data=False)  # restores the latest checkpoint
    run.checkpointer.close()
    assert run.start_step == saved[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.state.params))


LOCAL_WORDS = re.compile(r"/work/|/home/|/Users/|/root/|/mnt/|shared/seeds|\.\./shared|"
                         r"recalled from memory|\(seeds:")


def test_user_facing_text_names_no_local_folders():
    """Docs, notebooks, configs and benchmarks cite papers, repositories or guide titles."""
    paths = ["README.md", *glob.glob(os.path.join(ROOT, "docs", "**", "*.*"), recursive=True),
             *glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")),
             *glob.glob(os.path.join(ROOT, "configs", "*.py")),
             *glob.glob(os.path.join(ROOT, "bench", "*.py")),
             os.path.join(ROOT, "simpo_jax", "doctor.py")]
    found = []
    for path in paths:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if LOCAL_WORDS.search(line):
                    found.append(f"{os.path.relpath(os.path.join(ROOT, path), ROOT)}:{number}: "
                                 f"{line.strip()[:120]}")
    assert len(paths) > 15 and not found, "\n".join(found)
