"""Device check of the attention kernels: a ~1B Llama in bfloat16, each batch layout, XLA vs kernel.

    python3 bench/device_check.py            # one H100 / H200 (flash) or TPU chip (splash), < 8 min
    python3 bench/device_check.py --dry-run  # a tiny model on a CPU, kernels interpreted

For each layout (padded, packed, shared_prompt) and attention (xla and the device's kernel; add
more with --impls, e.g. --impls=xla,cudnn,flash), the jitted train step over one batch of about
8k real-token slots (rows of 2,048 tokens, or 8 pairs padded to 512): median step time, real
tokens/s, MFU against the card's listed bf16 peak (flops.peak_flops_per_device), the compiled
step's memory (arguments + temporaries), and the loss of the first step against a float32 XLA run
of the same batch and weights on the host CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from gpu_check import Sizes, random_pairs  # noqa: E402
from simpo_jax import flops, models, optim  # noqa: E402
from simpo_jax import loss as loss_lib  # noqa: E402
from simpo_jax import sharding as sharding_lib  # noqa: E402
from simpo_jax import step as step_lib  # noqa: E402
from simpo_jax.data import packed  # noqa: E402
from simpo_jax.data.batch import batch_shardings  # noqa: E402
from simpo_jax.data.padded import make_batch  # noqa: E402

# Llama-3.2-1B's trunk (16 layers, 2048 wide, GQA 2:1) with head dim 128 and a 32k vocabulary:
# 0.89B parameters.
ONE_B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
             num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
             max_position_embeddings=4096)
TINY = dict(ONE_B, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1)
LAYOUTS = ("padded", "packed", "shared_prompt")
KERNEL = {"gpu": "flash", "tpu": "splash", "cpu": "splash"}


def one_batch(pairs, layout: str, row_length: int, rows: int):
    """A step's batch: `rows` rows of row_length tokens, or `rows` pairs padded to half a row
    (the same token slots)."""
    if layout == "padded":
        return make_batch(pairs, np.arange(rows), np.ones(rows), 0, row_length // 2)
    return next(packed.row_batches(pairs, layout=layout, rows_per_process=rows, seed=0,
                                      pad_id=0, row_length=row_length, max_pairs_per_row=32))


def step_parts(config, layout: str, impl: str, dtype):
    """(graphdef, params, jitted train step, state shardings, tx, mesh) on one device."""
    graphdef, params = nnx.split(models.from_config(config, dtype=dtype, seed=0, attention=impl),
                                 nnx.Param)
    tx, schedule = optim.make_optimizer(optim.OptimConfig.from_config(base.get_config()),
                                        total_steps=1000)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(
        mesh, abstract, batch_layout=layout, graphdef=graphdef, tx=tx, schedule=schedule,
        cfg=LOSS, accumulation_steps=1, logits_chunk_size=256)
    return graphdef, params, fn, state_sh, tx, mesh


LOSS = loss_lib.LossConfig.from_config(base.get_config())  # the recipes' defaults


def cpu_loss(config, params_host, layout: str, batch) -> float:
    """The batch's SimPO loss in float32 on the host CPU, XLA attention, the same weights."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        graphdef, _ = nnx.split(models.from_config(config, dtype=jnp.float32, seed=0,
                                                   attention="xla"), nnx.Param)
        params = jax.device_put(params_host, cpu)
        sums = jax.jit(lambda p, b: step_lib.eval_sums(p, b, graphdef=graphdef, cfg=LOSS,
                                                       logits_chunk_size=256))(params, batch)
        return float(loss_lib.finalize_metrics(sums, LOSS)["loss"])


def run_one(config, layout: str, impl: str, batch, steps: int, peak: float, per_token: float):
    """One row of the table: step time, tokens/s, MFU, memory, device loss vs CPU float32."""
    graphdef, params, fn, state_sh, tx, mesh = step_parts(config, layout, impl, jnp.bfloat16)
    params_host = jax.device_get(params)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    device_batch = jax.device_put(batch, batch_shardings(mesh, layout))
    with jax.set_mesh(mesh):  # the kernels run per shard of the step's mesh
        start = time.perf_counter()
        compiled = fn.lower(state, device_batch).compile()
        compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    memory = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    times, first = [], None
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - start)
        first = metrics if first is None else first
    median = statistics.median(times[1:])
    tok_s = float(first["num_tokens"]) / median
    reference = cpu_loss(config, params_host, layout, batch)
    print(f"{layout:<14}{impl:<8}{median:>10.4f}{tok_s:>12.0f}{per_token * tok_s / peak:>8.1%}"
          f"{memory / 2**30:>10.2f}{float(first['loss']):>11.5f}{reference:>11.5f}"
          f"{abs(float(first['loss']) - reference):>10.2e}{compile_s:>9.1f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, seconds")
    parser.add_argument("--impls", default="", help="comma-separated; default xla and the kernel")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.dry_run:
        print("dry run: sizes shrunk, figures meaningless", flush=True)
    backend = jax.default_backend()
    config, row_length, rows = (TINY, 256, 1) if args.dry_run else (ONE_B, 2048, 4)
    steps = 1 if args.dry_run else args.steps
    impls = args.impls.split(",") if args.impls else ["xla", KERNEL.get(backend, "splash")]
    arch, _ = models.arch_from_hf_config(config)
    lengths = (row_length // 40, row_length // 7)
    pairs = random_pairs(256, seed=1, sizes=Sizes(small=config, large=config, lengths=lengths))
    seq_len = int(np.mean([len(p) + len(c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)]))
    per_token = flops.model_flops_per_token(arch, seq_len=seq_len)
    peak, source = flops.peak_flops_per_device(jax.devices()[0], jnp.bfloat16)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; "
          f"{flops.non_embedding_params(arch) / 1e6:.0f}M non-embedding parameters, bf16 compute; "
          f"peak {peak / 1e12:.0f} TFLOP/s ({source})", flush=True)
    print(f"{'layout':<14}{'attn':<8}{'median s':>10}{'real tok/s':>12}{'MFU':>8}{'mem GiB':>10}"
          f"{'loss':>11}{'cpu f32':>11}{'|diff|':>10}{'compile':>9}", flush=True)
    for layout in args.layouts.split(","):
        batch = one_batch(pairs, layout, row_length, rows)
        for impl in impls:
            run_one(config, layout, impl, batch, steps, peak, per_token)


if __name__ == "__main__":
    main()
