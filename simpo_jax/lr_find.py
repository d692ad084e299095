"""--mode=lr_find: the learning-rate range test on real SimPO steps, never touching the run."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import ml_collections

from simpo_jax import optim
from simpo_jax import plots
from simpo_jax.build import build, train_batch_iterator


def lr_find(config) -> dict:
    """--mode=lr_find: the LR range test on real SimPO steps, in <output_dir>/lr_find.

    The learning rate grows exponentially from lr_find_min to lr_find_max over lr_find_steps
    steps, starting from the configured weights (never from, or into, the run's checkpoints); the
    sweep stops early once the loss diverges. Writes lr_find.json and lr_find.png there.
    """
    out = os.path.join(config.output_dir, "lr_find")
    if jax.process_index() == 0 and os.path.exists(out):
        shutil.rmtree(out)
    sweep = ml_collections.ConfigDict(config.to_dict(), allow_dotted_keys=True)  # dotted mixer keys
    sweep.output_dir, sweep.resume_from, sweep.max_steps = out, "", config.lr_find_steps
    sweep.lock()
    schedule = optim.range_test_schedule(config.lr_find_min, config.lr_find_max,
                                         config.lr_find_steps)
    run = build(sweep, schedule=schedule)
    run.checkpointer.close()
    batches = train_batch_iterator(run)
    lrs, losses = [], []
    with batches:
        for step in range(config.lr_find_steps):
            run.state, metrics = run.train_step(run.state, next(batches))
            loss = float(metrics["loss"])
            lrs.append(float(metrics["learning_rate"]))
            losses.append(loss)
            if not math.isfinite(loss) or (step > 10 and loss > 4 * min(losses)):
                break  # diverged: the rest of the sweep says nothing new
    suggestion = plots.suggest_lr(lrs, losses)
    result = {"suggested_learning_rate": suggestion, "learning_rates": lrs, "losses": losses}
    if jax.process_index() == 0:
        with open(os.path.join(out, "lr_find.json"), "w") as f:
            json.dump(result, f, indent=2)
        plots.plot_lr_find(lrs, losses, suggestion, os.path.join(out, "lr_find.png"))
        print(f"LR range test over {len(lrs)} steps ({lrs[0]:.2e} to {lrs[-1]:.2e}): suggested "
              f"learning_rate {suggestion:.2e} (steepest loss decrease). Plot: "
              f"{os.path.join(out, 'lr_find.png')}", flush=True)
    return result
