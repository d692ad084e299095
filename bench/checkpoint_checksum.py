"""What the checkpoint checksums cost: the checksum alone, a save and a restore with and without it.

    python bench/checkpoint_checksum.py [--gib=1] [--rounds=3] [--dry-run]

A state of float32 arrays shaped like a model's (large matrices and small vectors), built in
memory on the default device; saves and restores go through simpo_jax.checkpoint.Checkpointer
(the checksummed path) and through its orbax manager directly (the path without checksums),
interleaved round by round (which goes first alternates) so machine load hits both alike; medians
per GiB, the checksum alone as the best of 3 per round. `save returns` is
what the train loop waits for (the checksum plus orbax's copy to host); the write itself runs in
the background. Restores read files the save just wrote, so mostly from the page cache.
--dry-run: a 4 MiB state and one round, to check that the script runs (a test does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from simpo_jax import checkpoint as ckpt_lib  # noqa: E402
from simpo_jax import checksum  # noqa: E402

MATRIX = 2048  # float32 2048 x 2048: 16 MiB, a mid-sized model's projection


def make_state(gib: float, size: int = MATRIX) -> dict:
    """About `gib` GiB of float32: size x size random matrices plus one small vector each."""
    rng = np.random.default_rng(0)
    count = max(1, round(gib * 2**30 / (size * size * 4)))
    return {f"layer_{i}": {"kernel": jax.device_put(rng.standard_normal((size, size), np.float32)),
                           "scale": jax.device_put(np.ones(size, np.float32))}
            for i in range(count)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_save(checkpointer, step, state):
    """The save before checksums: the same Composite, the meta without them."""
    checkpointer.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step})), force=True)


def plain_restore(checkpointer, step, abstract):
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    jax.block_until_ready(restored["state"])


def checked_restore(checkpointer, step, abstract):
    jax.block_until_ready(checkpointer.restore(abstract, step=step))


def measure(state, rounds: int, folder: str) -> dict[str, list[float]]:
    """Seconds per round of each measured operation."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    checksum.checksums(state)  # compile
    checkpointer = ckpt_lib.Checkpointer(folder, save_total_limit=0)
    times = {name: [] for name in ("checksum", "save returns, plain", "save returns, checked",
                                   "save total, plain", "save total, checked",
                                   "restore, plain", "restore, checked")}
    savers = {"plain": lambda step: plain_save(checkpointer, step, state),
              "checked": lambda step: checkpointer.save(step, state, {"step": step})}
    step = 0
    for round_ in range(rounds + 1):  # round 0 warms up orbax and is dropped
        result = {"checksum": min(timed(lambda: checksum.checksums(state)) for _ in range(3))}
        saved = {}
        for kind in sorted(savers, reverse=round_ % 2 == 1):  # alternate which goes first
            step += 1
            returned = timed(lambda: savers[kind](step))
            result[f"save returns, {kind}"] = returned
            result[f"save total, {kind}"] = returned + timed(checkpointer.wait)
            saved[kind] = step
        result["restore, plain"] = timed(lambda: plain_restore(checkpointer, saved["plain"],
                                                               abstract))
        result["restore, checked"] = timed(lambda: checked_restore(checkpointer, saved["checked"],
                                                                   abstract))
        if round_:
            for name, seconds in result.items():
                times[name].append(seconds)
        for old in checkpointer.steps():
            shutil.rmtree(os.path.join(folder, str(old)))
        checkpointer.manager.reload()
    checkpointer.close()
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--dry-run", action="store_true", help="a 4 MiB state, one round")
    args = parser.parse_args(argv)
    if args.dry_run:
        print("dry run: sizes shrunk, figures meaningless", flush=True)
        state, rounds = make_state(4 / 1024, size=512), 1
    else:
        state, rounds = make_state(args.gib), args.rounds
    size = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**30
    folder = tempfile.mkdtemp(prefix="checksum_bench_")
    try:
        times = measure(state, rounds, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{size * 1024:.0f} MiB of float32 in {len(jax.tree.leaves(state))} arrays on "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores seen, load average "
          f"{os.getloadavg()[0]:.1f}); median of {rounds} rounds")
    print("| operation | s | s per GiB |")
    print("|---|---|---|")
    for name, seconds in times.items():
        med = statistics.median(seconds)
        print(f"| {name} | {med:.3f} | {med / size:.3f} |")
    return times


if __name__ == "__main__":
    main()
