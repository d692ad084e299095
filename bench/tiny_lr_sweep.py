"""Where does the tiny config learn? Short runs at several learning rates, then --mode=lr_find.

    python bench/tiny_lr_sweep.py                      # ~12 min on 2 cores
    python bench/tiny_lr_sweep.py --steps 60 --rates 1e-4 1e-3 1e-2
    python bench/tiny_lr_sweep.py --set model_name_or_path=assets/tiny_sft --set model_init={}
    python bench/tiny_lr_sweep.py --dry-run            # 1 rate x 3 steps, 5-step lr_find

Each rate trains the tiny config (configs/tiny.py, its own schedule and batch) for --steps steps
from the same initial weights and reports the final eval loss and reward accuracy; a rate
"learns" when the final eval loss is at least --fall (5%) below its start. Then the LR range test
runs with the config's defaults and its suggestion is printed next to the range.
tests/test_plots.py records the measured range: rerun this when configs/tiny.py changes.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402


def tiny_config(overrides: list[str]):
    """configs/tiny.py with `field=value` overrides (values as Python literals, else strings)."""
    c = tiny.get_config()
    for item in overrides:
        field, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        setattr(c, field, value)
    return c


def short_run(rate: float, steps: int, out: str, overrides: list[str]) -> dict:
    from simpo_jax import train

    c = tiny_config(overrides)
    c.learning_rate, c.max_steps, c.output_dir = rate, steps, out
    c.eval_steps = c.save_steps = 10 * steps  # evaluate at the start and the end only
    c.report_to, c.num_samples = (), 0
    c.lock()
    train.train(c)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "eval_loss" in r]
    return {"start_loss": evals[0]["eval_loss"], "loss": evals[-1]["eval_loss"],
            "accuracy": evals[-1]["eval_rewards/accuracies"]}


DRY_RUN = dict(steps=3, rates=[1e-2])
DRY_RUN_SET = ["lr_find_steps=5"]  # the fewest the range test's suggestion allows, and a margin


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rates", type=float, nargs="+",
                        default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--fall", type=float, default=0.05)
    parser.add_argument("--skip-lr-find", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run, e.g. learning_rate=1e-4")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"the same runs, tiny: {DRY_RUN} and {DRY_RUN_SET}")
    args = parser.parse_args(argv)
    if args.dry_run:
        vars(args).update(DRY_RUN)
        args.set = args.set + DRY_RUN_SET
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print("dry run: sizes shrunk, figures meaningless", flush=True)
    tmp = tempfile.mkdtemp(prefix="tiny_lr_sweep_")
    results = {}
    for rate in args.rates:
        start = time.time()
        r = short_run(rate, args.steps, os.path.join(tmp, f"lr{rate:g}"), args.set)
        r["learns"] = r["loss"] <= (1 - args.fall) * r["start_loss"]
        results[rate] = r
        print(f"RESULT lr={rate:.2g} steps={args.steps} eval_loss {r['start_loss']:.3f} -> "
              f"{r['loss']:.3f} eval_accuracy {r['accuracy']:.3f} learns={r['learns']} "
              f"({time.time() - start:.0f}s)", flush=True)
    learning = [rate for rate, r in results.items() if r["learns"]]
    print(f"RANGE learns (eval loss {args.fall:.0%} below its start after {args.steps} steps): "
          f"{min(learning):.2g} .. {max(learning):.2g}" if learning else "RANGE none", flush=True)
    if args.skip_lr_find:
        return
    from simpo_jax import lr_find

    c = tiny_config(args.set)
    c.output_dir = os.path.join(tmp, "lr_find")
    c.lock()
    found = lr_find.lr_find(c)
    print(f"RESULT lr_find suggestion {found['suggested_learning_rate']:.2e} over "
          f"{found['learning_rates'][0]:.1e}..{found['learning_rates'][-1]:.1e} "
          f"({len(found['losses'])} steps)", flush=True)


if __name__ == "__main__":
    main()
