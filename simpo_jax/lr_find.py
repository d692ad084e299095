"""--mode=lr_find: the learning-rate range test on real SimPO steps, never touching the run."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections

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


def lr_find(config) -> dict:
    """--mode=lr_find: the LR range test on real SimPO steps, in <output_dir>/lr_find.

    The learning rate grows exponentially over lr_find_steps steps (sweep_range), starting from
    the configured weights (never from, or into, the run's checkpoints); the sweep stops early once
    the loss diverges (plots.diverged). The suggestion is the steepest fall of the smoothed loss
    (plots.suggest_lr). Writes lr_find.json and lr_find.png there.
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
            if plots.diverged(losses):
                break  # the rest of the sweep says nothing new
    found = plots.suggest_lr(lrs, losses)
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
