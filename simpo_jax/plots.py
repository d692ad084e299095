"""PNG plots of a run's metrics.jsonl, and the LR range test's plot and suggestion."""

from __future__ import annotations

import json
import math
import os

import numpy as np

# (file name, title, [(metric key, label)]); eval_ twins are drawn dashed where they exist.
PANELS = (
    ("loss.png", "SimPO loss", [("loss", "loss")]),
    ("rewards.png", "Rewards (beta x avg log-prob)", [("rewards/chosen", "chosen"),
                                                       ("rewards/rejected", "rejected")]),
    ("margins.png", "Reward margin (chosen - rejected)", [("rewards/margins", "margin")]),
    ("accuracies.png", "Reward accuracy", [("rewards/accuracies", "accuracy")]),
    ("logps.png", "Average completion log-prob", [("logps/chosen", "chosen"),
                                                  ("logps/rejected", "rejected")]),
    ("learning_rate.png", "Learning rate", [("learning_rate", "learning rate")]),
)


def _series(rows, key):
    points = [(r["step"], float(r[key])) for r in rows if key in r]
    return [(s, v) for s, v in points if math.isfinite(v)]


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """One PNG per panel (train solid, eval dashed) in out_dir/plots; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        print(f"No metrics to plot: {metrics_path} does not exist.")
        return []
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    for name, title, keys in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        drawn = 0
        for key, label in keys:
            for prefix, style, tag in (("", "-", "train"), ("eval_", "--", "eval")):
                points = _series(rows, prefix + key)
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, marker="o" if prefix else None, markersize=3,
                            label=f"{tag} {label}")
                    drawn += 1
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(plot_dir, name)
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def smooth_losses(losses, window: int | None = None) -> np.ndarray:
    """Centred moving average of the range test's losses (`window` points; default 1/20 of them).

    Centred, so the smoothed curve does not lag behind the learning rate as a running average
    would; the window shrinks at both ends.
    """
    values = np.asarray(losses, float)
    window = window or max(3, len(values) // 20)
    half = window // 2
    index = np.arange(len(values))
    lo, hi = np.maximum(0, index - half), np.minimum(len(values), index + half + 1)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    return (sums[hi] - sums[lo]) / (hi - lo)


def diverged(losses, warmup: int = 10, smoothing: float = 0.9) -> bool:
    """Whether the sweep so far has diverged: a non-finite loss, or a running average of the loss
    (bias-corrected, factor `smoothing`) above 1.5x its value after `warmup` steps, or above that
    value after falling below a quarter of it. SimPO's loss starts near -log sigmoid(-gamma) and
    falls towards 0 while the model learns, so a return above the start means the rate is too high.
    """
    losses = np.asarray(losses, float)
    if not np.isfinite(losses).all():
        return True
    if len(losses) <= warmup:
        return False
    avg, run = 0.0, []
    for i, loss in enumerate(losses):
        avg = smoothing * avg + (1 - smoothing) * loss
        run.append(avg / (1 - smoothing ** (i + 1)))
    start, lowest, now = run[warmup - 1], min(run[warmup - 1:]), run[-1]
    return bool(now > min(1.5 * start, max(4 * lowest, start)))


def suggest_lr(lrs, losses, window: int | None = None, decades: float | None = None) -> dict:
    """The LR range test's suggestion: where the smoothed loss falls fastest, before its minimum.

    The losses up to the first non-finite one are smoothed (smooth_losses); the fall at each
    point is the slope of the smoothed loss against log10(learning rate) across `decades` (one
    decade, or a quarter of a shorter sweep) centred on it, so that batch-to-batch noise, which a
    point-to-point slope amplifies, cannot pick the point. The suggestion is the learning rate of
    the steepest fall among the points up to the smoothed minimum. Returns it, the smoothed curve,
    the rate at the minimum and how far the smoothed loss fell (a fraction of its start).
    """
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    bad = np.nonzero(~np.isfinite(losses))[0]
    end = int(bad[0]) if len(bad) else len(losses)
    if end < 3:
        raise ValueError(f"The LR range test needs at least 3 finite losses, got {end}.")
    lrs, smooth = lrs[:end], smooth_losses(losses[:end], window)
    x = np.log10(lrs)
    decades = decades or min(1.0, (x[-1] - x[0]) / 4)
    half = max(1, int(round(decades / 2 * (end - 1) / max(x[-1] - x[0], 1e-12))))
    lowest = int(np.argmin(smooth))
    index = np.arange(max(lowest + 1, 2))
    lo, hi = np.maximum(0, index - half), np.minimum(end - 1, index + half)
    slope = (smooth[hi] - smooth[lo]) / (x[hi] - x[lo])
    return {"suggested_learning_rate": float(lrs[int(np.argmin(slope))]),
            "smoothed_losses": [float(v) for v in smooth],
            "loss_fall": float((smooth[0] - smooth[lowest]) / abs(smooth[0])),
            "lowest_loss_learning_rate": float(lrs[lowest])}


def plot_lr_find(lrs, losses, suggestion: float, out_path: str, smoothed=None) -> str:
    """Loss (and its smoothed curve) against the learning rate, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(lrs, losses, "-", alpha=0.4 if smoothed is not None else 1.0, label="loss")
    if smoothed is not None:
        ax.plot(lrs[:len(smoothed)], smoothed, "-", color="tab:blue", label="smoothed")
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("SimPO loss")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
