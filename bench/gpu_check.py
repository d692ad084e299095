"""GPU check of the packed layouts: cuDNN attention vs the XLA path, and the step's throughput.

    python3 bench/gpu_check.py            # on a machine with one NVIDIA GPU, ~3-5 min
    python3 bench/gpu_check.py throughput # one part only (correctness / throughput)
    python3 bench/gpu_check.py --dry-run  # tiny sizes, ~1 min on CPU (the compiles): tests run it

Part 1 (correctness): per-pair average completion log-probabilities of the packed and
shared-prompt rows against the padded batch, on the GPU, for float32 XLA attention (matmuls at
'highest' precision), bfloat16 XLA attention and bfloat16 cuDNN attention (the `auto` choice on
GPU), each row's mask carrying the segment / branch structure.
Part 2 (throughput): the jitted train step of a ~0.2B Llama (32k vocabulary) in bfloat16 compute
over float32 parameters, each layout with XLA and cuDNN attention: median step time, real tokens/s,
pairs/s and model-FLOP utilisation against a bfloat16 8192^3 matmul measured in the same run.
Without a GPU only XLA attention runs, at smaller sizes (a smoke test); --dry-run shrinks every
size further (a 1-layer, 32-wide model, a few short pairs, two steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from simpo_jax import flops, models, optim  # noqa: E402
from simpo_jax import loss as loss_lib  # noqa: E402
from simpo_jax import sharding as sharding_lib  # noqa: E402
from simpo_jax import step as step_lib  # noqa: E402
from simpo_jax.data import packed, packed_rows  # noqa: E402
from simpo_jax.data.batch import batch_shardings  # noqa: E402
from simpo_jax.data.padded import make_batch  # noqa: E402
from simpo_jax.data.pairs import TokenizedPairs  # noqa: E402

GPU = jax.default_backend() == "gpu"
IMPLS = ("xla", "cudnn") if GPU else ("xla",)
PARTS = ("correctness", "throughput")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of both parts: the GPU's, a CPU smoke test's, or a dry run's."""
    small: dict  # part 1's model (a Hugging Face config)
    large: dict  # part 2's model
    lengths: tuple[int, int] = (50, 150)  # tokens of each prompt, chosen and rejected
    pairs: int = 24  # part 1
    row_length: int = 1024  # part 1's packed rows
    chunk: int = 256  # part 1's logits chunk on packed rows
    peak_size: int = 8192  # the bfloat16 matmul that MFU divides by
    steps: int = 10
    pairs_per_step: int = 16
    pool: int = 4096  # pairs drawn from in part 2
    width: int = 512  # part 2's padded rows
    step_row_length: int = 2048  # part 2's packed rows
    step_chunk: int = 128  # part 2's logits chunk

    @property
    def vocab(self) -> int:
        return self.small["vocab_size"]


def llama(hidden, intermediate, layers, heads, kv_heads, positions, vocab=32000):
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=positions)


def sizes_for(dry_run: bool) -> Sizes:
    if dry_run:
        tiny = llama(32, 64, 1, 2, 1, 256, vocab=512)
        return Sizes(small=tiny, large=tiny, lengths=(4, 12), pairs=6, row_length=128, chunk=16,
                     peak_size=128, steps=2, pairs_per_step=2, pool=64, width=64,
                     step_row_length=128, step_chunk=16)
    small = llama(256, 688, 4, 4, 2, 1024)
    if GPU:
        return Sizes(small=small, large=llama(1024, 2816, 12, 16, 4, 2048))
    return Sizes(small=small, large=llama(128, 2816, 1, 16, 4, 2048), peak_size=1024, steps=2,
                 pairs_per_step=4)


def random_pairs(n, seed, sizes: Sizes):
    rng = np.random.default_rng(seed)
    lo, hi = sizes.lengths

    def ids():
        return rng.integers(4, sizes.vocab, rng.integers(lo, hi + 1)).astype(np.int32)

    return TokenizedPairs([ids() for _ in range(n)], [ids() for _ in range(n)],
                          [ids() for _ in range(n)], [f"gpu:{i}" for i in range(n)])


def rows_of(pairs, layout, row_length, max_pairs=32, rows_multiple=1):
    rows = packed.pack(packed.item_lengths(pairs, layout), row_length, max_pairs,
                       np.random.default_rng(0))
    rows += [np.zeros(0, np.int64)] * (-len(rows) % rows_multiple)
    batch = packed_rows.make_rows(pairs, rows, layout=layout, pad_id=0, row_length=row_length,
                                  max_pairs_per_row=max_pairs)
    return batch, packed.slot_pairs(rows, max_pairs)


def correctness(sizes: Sizes):
    pairs = random_pairs(sizes.pairs, seed=0, sizes=sizes)
    padded = make_batch(pairs, np.arange(sizes.pairs), np.ones(sizes.pairs), 0,
                        int(pairs.lengths().max()))
    stats = jax.jit(step_lib.pair_stats, static_argnums=(0, 3))
    results = {}
    for name, dtype, impl, precision in (("float32 xla", jnp.float32, "xla", "highest"),
                                         ("bfloat16 xla", jnp.bfloat16, "xla", "default"),
                                         ("bfloat16 cudnn", jnp.bfloat16, "cudnn", "default")):
        if impl not in IMPLS:
            continue
        with jax.default_matmul_precision(precision):
            graphdef, params = nnx.split(models.from_config(sizes.small, dtype=dtype, seed=1,
                                                            attention=impl), nnx.Param)
            ref = np.asarray(stats(graphdef, params, padded, 0)[0])
            results[name] = {"padded": ref}
            for layout in ("packed", "shared_prompt"):
                batch, slot_pair = rows_of(pairs, layout, sizes.row_length)
                got = np.asarray(stats(graphdef, params, batch, sizes.chunk)[0])
                real = slot_pair >= 0
                aligned = np.zeros_like(ref)
                aligned[slot_pair[real]] = got[real]
                results[name][layout] = aligned
                print(f"{name:<16} {layout:<14} max |avg logp - padded| = "
                      f"{np.abs(aligned - ref).max():.2e} (avg logps ~{ref.mean():.2f})", flush=True)
    for layout in ("padded", "packed", "shared_prompt"):
        if "cudnn" not in IMPLS:
            break
        d = np.abs(results["bfloat16 cudnn"][layout] - results["bfloat16 xla"][layout]).max()
        e = np.abs(results["bfloat16 cudnn"][layout] - results["float32 xla"]["padded"]).max()
        print(f"cudnn vs xla (bfloat16), {layout:<14}: {d:.2e}; cudnn vs float32 padded: {e:.2e}")


def step_batches(pairs, layout, sizes: Sizes):
    """sizes.steps host batches of about sizes.pairs_per_step pairs each, in `layout`."""
    n = sizes.pairs_per_step
    if layout == "padded":
        order = np.arange(n * sizes.steps)
        return [make_batch(pairs, order[i * n:(i + 1) * n], np.ones(n), 0, sizes.width)
                for i in range(sizes.steps)]
    items = packed.item_lengths(pairs, layout)
    row_length = sizes.step_row_length
    rows_per_step = int(np.ceil(n * items.mean() / (0.96 * row_length)))
    it = packed.row_batches(pairs, layout=layout, rows_per_process=rows_per_step, seed=0,
                            pad_id=0, row_length=row_length, max_pairs_per_row=32)
    return [next(it) for _ in range(sizes.steps)]


def compiled_step(layout, impl, sizes: Sizes):
    """The jitted train step of sizes.large with `impl` attention, and its initial state."""
    tx, schedule = optim.make_optimizer(optim.OptimConfig(
        learning_rate=1e-5, lr_scheduler_type="constant_with_warmup", warmup_ratio=0.0,
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, master_weights="float32", optimizer_state_dtype="float32",
        seed=0), total_steps=1000)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    cfg = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5)
    graphdef, params = nnx.split(models.from_config(sizes.large, dtype=jnp.bfloat16, seed=0,
                                                    attention=impl), nnx.Param)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(
        mesh, abstract, batch_layout=layout, graphdef=graphdef, tx=tx,
        schedule=schedule, cfg=cfg, accumulation_steps=1, logits_chunk_size=sizes.step_chunk)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    return fn, state, batch_shardings(mesh, layout)


def time_steps(fn, state, device_batches):
    """Seconds, real tokens and pairs of each step, every batch shape compiled beforehand."""
    seen = set()
    for b in device_batches:  # compile every shape
        shape = tuple(v.shape for v in jax.tree.leaves(b))
        if shape not in seen:
            seen.add(shape)
            state, m = fn(state, b)
            jax.block_until_ready(m)
    times, tokens, npairs = [], [], []
    for b in device_batches:
        t0 = time.perf_counter()
        state, m = fn(state, b)
        m = jax.device_get(m)
        times.append(time.perf_counter() - t0)
        tokens.append(float(m["num_tokens"]))
        npairs.append(float(m["num_pairs"]))
    return times, tokens, npairs


def throughput(sizes: Sizes):
    peak = flops.measured_matmul_flops(sizes.peak_size, dtype=jnp.bfloat16)
    arch, _ = models.arch_from_hf_config(sizes.large)
    pairs = random_pairs(sizes.pool, seed=1, sizes=sizes)
    seq_len = int(np.mean([len(p) + len(c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)]))
    per_token = flops.model_flops_per_token(arch, seq_len=seq_len)
    print(f"\nmodel: llama {flops.non_embedding_params(arch) / 1e6:.0f}M non-embedding params, "
          f"bf16 compute; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; "
          f"{per_token / 1e6:.0f}M model FLOPs per token", flush=True)
    print(f"{'layout':<14}{'attention':<10}{'pairs/step':>11}{'median s':>10}{'real tok/s':>12}"
          f"{'pairs/s':>9}{'MFU':>8}", flush=True)
    for layout in ("padded", "packed", "shared_prompt"):
        batches = step_batches(pairs, layout, sizes)
        for impl in IMPLS:
            fn, state, sh = compiled_step(layout, impl, sizes)
            device_batches = [jax.device_put(b, sh) for b in batches]
            times, tokens, npairs = time_steps(fn, state, device_batches)
            tok_s = sum(tokens) / sum(times)
            # MFU on the padded-equivalent work (prompt counted with each completion) would
            # overstate shared_prompt; this counts the tokens the model actually computed.
            print(f"{layout:<14}{impl:<10}{np.mean(npairs):>11.1f}"
                  f"{statistics.median(times):>10.4f}{tok_s:>12.0f}"
                  f"{sum(npairs) / sum(times):>9.1f}{per_token * tok_s / peak:>8.1%}", flush=True)
            del state, fn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"which of {', '.join(PARTS)} to run (default: both)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every size shrunk (a 1-layer 32-wide model, two steps); "
                             "figures meaningless")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    if args.dry_run:
        print("dry run: sizes shrunk, figures meaningless", flush=True)
    sizes = sizes_for(args.dry_run)
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    for part, fn in (("correctness", correctness), ("throughput", throughput)):
        if not args.parts or part in args.parts:
            fn(sizes)


if __name__ == "__main__":
    main()
