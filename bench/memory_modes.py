"""Step time and memory of each memory mode (master weights / AdamW moments / offload), one device.

    python bench/memory_modes.py
    python bench/memory_modes.py --dry-run  # a tiny model, one round: the test suite runs it

The same jitted train step as a run (simpo_jax.step) on a Llama-shaped model, bf16 compute; modes
timed interleaved (round robin), so machine load hits them alike; the median step per mode. Bytes
are XLA's memory analysis of each compiled step: device arguments (parameters + optimizer state +
batch), host arguments (an offloaded optimizer state) and temporaries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from simpo_jax import loss as loss_lib  # noqa: E402
from simpo_jax import models, optim, precision  # noqa: E402
from simpo_jax import sharding as sharding_lib  # noqa: E402
from simpo_jax import step as step_lib  # noqa: E402
from simpo_jax.data.batch import PaddedBatch, batch_shardings  # noqa: E402

MODEL = dict(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1408,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=512, tie_word_embeddings=False)
MODES = (("float32", "float32", False), ("float32", "bfloat16", False),
         ("bfloat16_kahan", "bfloat16", False), ("bfloat16_stochastic", "bfloat16", False),
         ("bfloat16_stochastic", "bfloat16", True))
PAIRS, LENGTH, ROUNDS = 4, 128, 8
# --dry-run: the same modes and steps on a model this small, one round.
DRY_RUN = dict(MODEL, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)


def build(master, moments, offload, mesh, batch, model_config):
    model = models.from_config(model_config, seed=0, dtype=jnp.bfloat16,
                               param_dtype=precision.param_dtype(master))
    graphdef, params = nnx.split(model, nnx.Param)
    cfg = optim.OptimConfig(learning_rate=5e-7, lr_scheduler_type="cosine", warmup_ratio=0.1,
                            warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                            adam_epsilon=1e-8, max_grad_norm=1.0, master_weights=master,
                            optimizer_state_dtype=moments, seed=0)
    tx, schedule = optim.make_optimizer(cfg, 1000)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(
        mesh, abstract, offload_optimizer_state=offload, graphdef=graphdef, tx=tx,
        schedule=schedule, cfg=loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5),
        accumulation_steps=2)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    compiled = fn.lower(state, batch).compile()  # one compile: measured, then run
    return compiled, state, compiled.memory_analysis()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, one round, seconds")
    args = parser.parse_args()
    model_config, pairs, length, rounds = ((DRY_RUN, 2, 32, 1) if args.dry_run
                                           else (MODEL, PAIRS, LENGTH, ROUNDS))
    if args.dry_run:
        print("dry run: sizes shrunk, figures meaningless")
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model_config["vocab_size"], size=(pairs, 2, length)).astype(np.int32)
    batch = PaddedBatch(input_ids=ids, completion_start=np.full((pairs, 2), length // 2, np.int32),
                        lengths=np.full((pairs, 2), length, np.int32),
                        pair_mask=np.ones(pairs, np.float32))
    batch = jax.device_put(batch, batch_shardings(mesh))
    runs = {}
    for mode in MODES:
        fn, state, mem = build(*mode, mesh, batch, model_config)
        state, m = fn(state, batch)  # warm-up
        jax.block_until_ready(m)
        runs[mode] = [fn, state, mem, []]
    for _ in range(rounds):
        for mode, run in runs.items():
            start = time.perf_counter()
            run[1], m = run[0](run[1], batch)
            jax.block_until_ready((run[1], m))
            run[3].append(time.perf_counter() - start)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(models.from_config(model_config), nnx.Param)))
    base = statistics.median(runs[MODES[0]][3])
    print(f"{n / 1e6:.1f}M parameters, {pairs} pairs x {length} tokens x accumulation 2, bf16 "
          f"compute, {jax.devices()[0].platform}; MiB per device; median of {rounds} interleaved steps")
    print("| master weights | moments | offload | device args | host args | temp | step s | vs f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for (master, moments, offload), (_, _, mem, times) in runs.items():
        med = statistics.median(times)
        print(f"| {master} | {moments} | {'host' if offload else '-'} "
              f"| {mem.argument_size_in_bytes / 2**20:.1f} "
              f"| {getattr(mem, 'host_argument_size_in_bytes', 0) / 2**20:.1f} "
              f"| {mem.temp_size_in_bytes / 2**20:.1f} | {med:.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
