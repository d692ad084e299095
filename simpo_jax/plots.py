"""PNG plots: a run's metrics.jsonl, and the LR range test's loss curve (its mathematics is
lr_find.py's)."""

from __future__ import annotations

import json
import math
import os

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
