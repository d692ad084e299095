"""Plots from metrics.jsonl, the LR range test's suggestion, and --mode=lr_find / --mode=plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simpo_jax import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plots_from_metrics_with_eval_rows_and_nan(tmp_path):
    rows = [{"step": 0, "eval_loss": 1.3, "eval_rewards/accuracies": 0.5}]
    for s in range(1, 11):
        rows.append({"step": s, "loss": 1.3 - 0.1 * s, "rewards/chosen": -s * 0.1,
                     "rewards/rejected": -s * 0.2, "rewards/margins": s * 0.1,
                     "rewards/accuracies": 0.5 + 0.04 * s, "logps/chosen": -2.0,
                     "logps/rejected": -3.0, "learning_rate": 1e-3, "grad_norm": "nan"})
    rows.append({"step": 10, "eval_loss": 0.4, "eval_rewards/accuracies": 0.9})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    written = plots.plot_metrics(str(path), str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(p[0] for p in plots.PANELS)
    for p in written:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_no_metrics_is_not_a_crash(tmp_path):
    assert plots.plot_metrics(str(tmp_path / "missing.jsonl"), str(tmp_path)) == []


def test_suggestion_is_the_steepest_descent_before_divergence(tmp_path):
    lrs = np.logspace(-7, -1, 121)
    x = np.log10(lrs)
    losses = 1.0 - 0.5 * np.tanh((x + 4.0) * 2)  # steepest at 1e-4
    losses[x > -2] += np.exp((x[x > -2] + 2) * 6) - 1  # blows up after 1e-2
    suggestion = plots.suggest_lr(lrs, losses, smoothing=0.0)
    assert 10 ** -4.1 < suggestion < 10 ** -3.9
    out = plots.plot_lr_find(lrs, losses, suggestion, str(tmp_path / "lr_find.png"))
    assert os.path.getsize(out) > 5000


@pytest.mark.slow
def test_lr_find_and_plot_modes_on_the_tiny_config(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints" / "7")  # a real run's checkpoint folder must stay untouched
    proc = subprocess.run(
        [sys.executable, "run.py", "--config=configs/tiny.py", "--mode=lr_find",
         f"--config.output_dir={out}", "--config.lr_find_steps=60", "--config.lr_find_min=1e-6",
         "--config.lr_find_max=1.0"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "suggested learning_rate" in proc.stdout
    result = json.loads((out / "lr_find" / "lr_find.json").read_text())
    assert 1e-6 <= result["suggested_learning_rate"] <= 1.0
    assert result["learning_rates"][0] == pytest.approx(1e-6, rel=1e-4)
    assert (out / "lr_find" / "lr_find.png").stat().st_size > 5000
    assert os.listdir(out / "checkpoints") == ["7"]

    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    proc = subprocess.run([sys.executable, "run.py", "--config=configs/tiny.py", "--mode=plot",
                           f"--config.output_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loss.png" in proc.stdout
