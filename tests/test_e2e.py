"""A shortened end-to-end run of the tiny config: the output contract of the README."""

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


def test_short_tiny_run_output_contract(tmp_path):
    from simpo_jax import train

    # 8 forced CPU devices here: 2 pairs per device keeps the global batch at the tiny default's 16.
    out = tmp_path / "run"
    config = tiny_config(out, max_steps=40, eval_steps=20, save_steps=20, logging_steps=10,
                         per_device_train_batch_size=2, per_device_eval_batch_size=8)
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
    assert 0.25 <= eval_rows[0]["eval_rewards/accuracies"] <= 0.75  # untrained: near chance
    assert final["rewards/accuracies"] == eval_rows[-1]["eval_rewards/accuracies"]
    assert sorted(os.listdir(out / "checkpoints")) == ["20", "40"]
    report = json.loads((out / "data_report.json").read_text())
    assert report["splits"]["train"]["rows_kept"] == 3000
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0] * 4 + [20] * 4 + [40] * 4
    assert all(s["prompt"] and isinstance(s["completion"], str) for s in samples)
    assert os.listdir(out / "tensorboard")  # the default sink besides metrics.jsonl

    # output_dir is a Hugging Face model folder that transformers loads and generates with.
    torch = pytest.importorskip("torch")
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


def test_unknown_config_field_is_one_line_error():
    proc = subprocess.run([sys.executable, "run.py", "--config=configs/tiny.py",
                           "--config.no_such_field=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_field" in lines[0], proc.stderr
