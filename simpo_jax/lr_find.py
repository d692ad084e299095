"""--mode=lr_find: the learning-rate range test on real SimPO steps, never touching the run: the
sweep, when it has diverged, and the suggested rate."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from simpo_jax import optim
from simpo_jax import plots
from simpo_jax.build import build
from simpo_jax.errors import UserError


def sweep_range(config) -> tuple[float, float]:
    """(first, last) learning rate of the sweep: lr_find_min/max, else learning_rate / x span."""
    low = config.lr_find_min or config.learning_rate / config.lr_find_span
    high = config.lr_find_max or config.learning_rate * config.lr_find_span
    if not 0 < low < high:
        raise UserError(
            f"lr_find_min={config.lr_find_min:g}, lr_find_max={config.lr_find_max:g} "
            f"(learning_rate={config.learning_rate:g}, lr_find_span={config.lr_find_span:g}) give a sweep from "
            f"{low:g} to {high:g}: the first rate must be positive and below the last.")
    return low, high


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


def lr_find(config) -> dict:
    """--mode=lr_find: the LR range test on real SimPO steps, in <output_dir>/lr_find.

    The learning rate grows exponentially over lr_find_steps steps (sweep_range), starting from
    the configured weights (never from, or into, the run's checkpoints); the sweep stops early once
    the loss diverges (diverged). The suggestion is the steepest fall of the smoothed loss
    (suggest_lr). Writes lr_find.json and lr_find.png there.
    """
    low, high = sweep_range(config)
    out = os.path.join(config.output_dir, "lr_find")
    if jax.process_index() == 0 and os.path.exists(out):
        shutil.rmtree(out)
    sweep = ml_collections.ConfigDict(config.to_dict(), allow_dotted_keys=True)  # dotted mixer keys
    sweep.output_dir, sweep.resume_from, sweep.max_steps = out, "", config.lr_find_steps
    sweep.lock()
    schedule = optim.range_test_schedule(low, high, config.lr_find_steps)
    run = build(sweep, schedule=schedule)
    run.checkpointer.close()
    batches = run.batcher.batches()
    lrs, losses = [], []
    with batches:
        for _ in range(config.lr_find_steps):
            run.state, metrics = run.train_step(run.state, next(batches))
            lrs.append(float(metrics["learning_rate"]))
            losses.append(float(metrics["loss"]))
            if diverged(losses):
                break  # the rest of the sweep says nothing new
    found = suggest_lr(lrs, losses)
    suggestion = found["suggested_learning_rate"]
    stopped = len(lrs) < config.lr_find_steps
    result = {**found, "learning_rates": lrs, "losses": losses, "sweep": [low, high],
              "stopped_on_divergence": stopped}
    if jax.process_index() == 0:
        with open(os.path.join(out, "lr_find.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot = plots.plot_lr_find(lrs, losses, suggestion, os.path.join(out, "lr_find.png"),
                                  smoothed=found["smoothed_losses"])
        print(f"LR range test over {len(lrs)} steps ({lrs[0]:.2e} to {lrs[-1]:.2e}"
              f"{', stopped when the loss diverged' if stopped else ''}): suggested "
              f"learning_rate {suggestion:.2e} (steepest fall of the smoothed loss; lowest loss at "
              f"{found['lowest_loss_learning_rate']:.2e}). Plot: {plot}", flush=True)
        if found["loss_fall"] < 0.05:
            print(f"The smoothed loss fell by only {found['loss_fall']:.0%} over the sweep, so the "
                  "suggestion is weak: widen it (--config.lr_find_span, or lr_find_min / "
                  "lr_find_max) or run more steps (--config.lr_find_steps).", flush=True)
        elif not stopped:
            print(f"The loss never diverged up to {lrs[-1]:.2e}: rates above the sweep may also "
                  "train; raise --config.lr_find_max to see where they stop.", flush=True)
    return result
