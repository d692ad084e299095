"""GPU check of the packed layouts: cuDNN attention vs the XLA path, and the step's throughput.

    python3 bench/gpu_check.py            # on a machine with one NVIDIA GPU, ~3-5 min

Part 1 (correctness): per-pair average completion log-probabilities of the packed and
shared-prompt rows against the padded batch, on the GPU, for float32 XLA attention (matmuls at
'highest' precision), bfloat16 XLA attention and bfloat16 cuDNN attention (the `auto` choice on
GPU), each row's mask carrying the segment / branch structure.
Part 2 (throughput): the jitted train step of a ~0.2B Llama (32k vocabulary) in bfloat16 compute
over float32 parameters, each layout with XLA and cuDNN attention: median step time, real tokens/s,
pairs/s and model-FLOP utilisation against a bfloat16 8192^3 matmul measured in the same run.
"""

from __future__ import annotations

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
IMPLS = ("xla", "cudnn") if GPU else ("xla",)  # a CPU run is a smoke test of the script
SMALL = dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)
LARGE = dict(model_type="llama", vocab_size=32000, hidden_size=1024 if GPU else 128,
             intermediate_size=2816, num_hidden_layers=12 if GPU else 1, num_attention_heads=16, num_key_value_heads=4,
             max_position_embeddings=2048)


def random_pairs(n, seed, lo=50, hi=150):
    rng = np.random.default_rng(seed)

    def ids():
        return rng.integers(4, 32000, rng.integers(lo, hi + 1)).astype(np.int32)

    return TokenizedPairs([ids() for _ in range(n)], [ids() for _ in range(n)],
                          [ids() for _ in range(n)], [f"gpu:{i}" for i in range(n)])


def rows_of(pairs, layout, row_length, max_pairs=32, rows_multiple=1):
    rows = packed.pack(packed.item_lengths(pairs, layout), row_length, max_pairs,
                       np.random.default_rng(0))
    rows += [np.zeros(0, np.int64)] * (-len(rows) % rows_multiple)
    batch = packed_rows.make_rows(pairs, rows, layout=layout, pad_id=0, row_length=row_length,
                                  max_pairs_per_row=max_pairs)
    return batch, packed.slot_pairs(rows, max_pairs)


def correctness():
    pairs = random_pairs(24, seed=0)
    padded = make_batch(pairs, np.arange(24), np.ones(24), 0, int(pairs.lengths().max()))
    stats = jax.jit(step_lib.pair_stats, static_argnums=(0, 3))
    results = {}
    for name, dtype, impl, precision in (("float32 xla", jnp.float32, "xla", "highest"),
                                         ("bfloat16 xla", jnp.bfloat16, "xla", "default"),
                                         ("bfloat16 cudnn", jnp.bfloat16, "cudnn", "default")):
        if impl not in IMPLS:
            continue
        with jax.default_matmul_precision(precision):
            graphdef, params = nnx.split(models.from_config(SMALL, dtype=dtype, seed=1,
                                                            attention=impl), nnx.Param)
            ref = np.asarray(stats(graphdef, params, padded, 0)[0])
            results[name] = {"padded": ref}
            for layout in ("packed", "shared_prompt"):
                batch, slot_pair = rows_of(pairs, layout, 1024)
                got = np.asarray(stats(graphdef, params, batch, 256)[0])
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


def throughput(steps=10 if GPU else 2):
    peak = flops.measured_matmul_flops(8192 if GPU else 1024, dtype=jnp.bfloat16)
    arch, _ = models.arch_from_hf_config(LARGE)
    pairs_per_step = 16 if GPU else 4
    pairs = random_pairs(4096, seed=1)
    seq_len = int(np.mean([len(p) + len(c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)]))
    per_token = flops.model_flops_per_token(arch, seq_len=seq_len)
    print(f"\nmodel: llama {flops.non_embedding_params(arch) / 1e6:.0f}M non-embedding params, "
          f"bf16 compute; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; "
          f"{per_token / 1e6:.0f}M model FLOPs per token", flush=True)
    tx, schedule = optim.make_optimizer(optim.OptimConfig(
        learning_rate=1e-5, lr_scheduler_type="constant_with_warmup", warmup_ratio=0.0,
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, master_weights="float32", optimizer_state_dtype="float32",
        seed=0), total_steps=1000)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    cfg = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5)
    print(f"{'layout':<14}{'attention':<10}{'pairs/step':>11}{'median s':>10}{'real tok/s':>12}"
          f"{'pairs/s':>9}{'MFU':>8}", flush=True)
    for layout in ("padded", "packed", "shared_prompt"):
        if layout == "padded":
            order = np.arange(pairs_per_step * steps)
            width = 512
            batches = [make_batch(pairs, order[i * pairs_per_step:(i + 1) * pairs_per_step],
                                  np.ones(pairs_per_step), 0, width) for i in range(steps)]
        else:
            items = packed.item_lengths(pairs, layout)
            row_length = 2048
            rows_per_step = int(np.ceil(pairs_per_step * items.mean() / (0.96 * row_length)))
            it = packed.row_batches(pairs, layout=layout, rows_per_process=rows_per_step,
                                    seed=0, pad_id=0, row_length=row_length,
                                    max_pairs_per_row=32)
            batches = [next(it) for _ in range(steps)]
        for impl in IMPLS:
            graphdef, params = nnx.split(models.from_config(LARGE, dtype=jnp.bfloat16, seed=0,
                                                            attention=impl), nnx.Param)
            abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
            fn, state_sh = step_lib.jit_train_step(
                mesh, abstract, batch_layout=layout, graphdef=graphdef, tx=tx,
                schedule=schedule, cfg=cfg, accumulation_steps=1, logits_chunk_size=128)
            state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
            sh = batch_shardings(mesh, layout)
            device_batches = [jax.device_put(b, sh) for b in batches]
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
            tok_s = sum(tokens) / sum(times)
            # MFU on the padded-equivalent work (prompt counted with each completion) would
            # overstate shared_prompt; this counts the tokens the model actually computed.
            print(f"{layout:<14}{impl:<10}{np.mean(npairs):>11.1f}"
                  f"{statistics.median(times):>10.4f}{tok_s:>12.0f}"
                  f"{sum(npairs) / sum(times):>9.1f}{per_token * tok_s / peak:>8.1%}", flush=True)
            del state, fn


if __name__ == "__main__":
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    if "throughput" not in sys.argv[1:]:
        correctness()
    if "correctness" not in sys.argv[1:]:
        throughput()
