"""The one function run.py calls: dispatch a validated config to a mode."""

from __future__ import annotations

import logging
import sys


def main(config, mode: str = "train"):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from simpo_jax import evaluation, lr_find, train

    modes = {"train": train.train, "eval": evaluation.evaluate_checkpoint,
             "export": train.export_checkpoint, "lr_find": lr_find.lr_find, "plot": plot,
             "plan": plan}
    if mode not in modes:
        raise ValueError(f"--mode={mode!r}: must be one of {sorted(modes)}.")
    from simpo_jax import hub

    try:
        return modes[mode](config)
    except hub.HubError as e:  # the message is the whole story: no traceback
        print(f"run.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def plot(config) -> list[str]:
    """--mode=plot: PNGs of <output_dir>/metrics.jsonl in <output_dir>/plots."""
    import os

    from simpo_jax import plots

    paths = plots.plot_metrics(os.path.join(config.output_dir, "metrics.jsonl"), config.output_dir)
    for path in paths:
        print(path)
    return paths


def plan(config) -> dict:
    """--mode=plan: ahead-of-time compile of the train step for config.plan_target; memory report."""
    from simpo_jax import plan as plan_lib

    return plan_lib.plan(config)
