"""A shortened end-to-end run of the tiny config: the output contract of the README, and learning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
              "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm"}


def tiny_config(output_dir, **overrides):
    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    c.output_dir = str(output_dir)
    for k, v in overrides.items():
        setattr(c, k, v)
    c.lock()
    return c


def read_rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def copy_rates(output_dir):
    from scripts import copy_rate

    return copy_rate.copy_rates_by_step(str(output_dir))


def test_short_tiny_run_output_contract(tmp_path):
    from simpo_jax import train

    # 8 forced CPU devices here: 2 pairs per device keeps the global batch at the tiny default's 16.
    out = tmp_path / "run"
    # 64 samples (the default shows 16) make the copy rate fine enough to see 40 steps of learning.
    config = tiny_config(out, max_steps=40, eval_steps=20, save_steps=20, logging_steps=10,
                         per_device_train_batch_size=2, per_device_eval_batch_size=8,
                         num_samples=64)
    final = train.train(config)
    rows = read_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    for r in train_rows:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert all(isinstance(r[k], float) and np.isfinite(r[k]) for k in TRAIN_KEYS - {"step"})
    assert [r["step"] for r in eval_rows] == [0, 20, 40]
    for r in eval_rows:
        assert {"eval_" + k for k in TRAIN_KEYS - {"step", "learning_rate", "grad_norm"}} <= set(r)
    assert final["rewards/accuracies"] == eval_rows[-1]["eval_rewards/accuracies"]
    assert sorted(os.listdir(out / "checkpoints")) == ["20", "40"]
    report = json.loads((out / "data_report.json").read_text())
    assert report["splits"]["train"]["rows_kept"] == 2993
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0] * 64 + [20] * 64 + [40] * 64
    assert all(s["prompt"] and isinstance(s["completion"], str) for s in samples)

    # It learns. The SFT base ranks its own mistakes above the right word more often than not
    # (measured 0.40); 40 steps later, rarely (0.87), and its greedy answers improve (0.30 -> 0.42).
    accuracy = [r["eval_rewards/accuracies"] for r in eval_rows]
    assert 0.25 <= accuracy[0] <= 0.6 and accuracy[-1] >= 0.8, accuracy
    assert eval_rows[-1]["eval_loss"] < 0.6 * eval_rows[0]["eval_loss"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    rates = copy_rates(out)
    assert rates[0] <= 0.4 and rates[40] > rates[0], rates
    assert os.listdir(out / "tensorboard")  # the default sink besides metrics.jsonl

    # output_dir is a Hugging Face model folder that transformers loads and generates with.
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Please repeat the word: apple"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    gen = hf.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]

    # ... and computes what our final parameters compute.
    from simpo_jax import models

    ours = models.from_pretrained(str(out))
    x = ids["input_ids"].numpy()
    with torch.no_grad():
        ref = hf(ids["input_ids"]).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(x)), ref, atol=1e-4)


@pytest.mark.slow
def test_default_tiny_run_learns_to_copy(tmp_path):
    from simpo_jax import train

    # The README's tiny run at full length (8 forced CPU devices x 2 pairs = its 16 pairs a step).
    final = train.train(tiny_config(tmp_path, per_device_train_batch_size=2,
                                    per_device_eval_batch_size=8, num_samples=64))
    accuracy = [r["eval_rewards/accuracies"] for r in read_rows(tmp_path) if "eval_loss" in r]
    assert accuracy[0] <= 0.6 and final["rewards/accuracies"] >= 0.95, accuracy  # measured 0.997
    rates = copy_rates(tmp_path)  # measured 0.30 -> 0.69 (step 100) -> 0.88 (step 300)
    assert rates[0] <= 0.4 and rates[300] >= 0.75 and rates[300] >= rates[0] + 0.4, rates


@pytest.mark.slow
@pytest.mark.parametrize("master_weights", ["bfloat16_kahan", "bfloat16_stochastic"])
def test_default_tiny_run_learns_in_the_bfloat16_memory_modes(tmp_path, master_weights):
    from simpo_jax import train

    # The run above with bfloat16 masters and moments, a third as long (its train accuracy is 1.0
    # from step 60): the same held-out accuracy. test_precision shows plain bfloat16 losing the
    # updates these modes keep.
    final = train.train(tiny_config(tmp_path, per_device_train_batch_size=2,
                                    per_device_eval_batch_size=8, num_samples=0, max_steps=100,
                                    eval_steps=50, master_weights=master_weights,
                                    optimizer_state_dtype="bfloat16"))
    accuracy = [r["eval_rewards/accuracies"] for r in read_rows(tmp_path) if "eval_loss" in r]
    assert accuracy[0] <= 0.6 and final["rewards/accuracies"] >= 0.95, accuracy


def test_unknown_config_field_is_one_line_error():
    proc = subprocess.run([sys.executable, "run.py", "--config=configs/tiny.py",
                           "--config.no_such_field=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_field" in lines[0], proc.stderr
