"""The peak FLOP/s that MFU divides by, checked on the machine: datasheet figure against measured.

    python3 bench/peak_check.py         # on a GPU or TPU machine, ~1 min
    python3 bench/peak_check.py         # on a CPU: also XLA's dots against torch's (the bench's)
    python3 bench/peak_check.py --dry-run  # small sizes, seconds (the test suite runs it)

For each compute dtype: simpo_jax.flops.peak_flops_per_device (the basis of the `mfu` metric) and
the measured rate of 8192^3 matmuls in that dtype at JAX's default precision, plus float32 at
'highest' precision. On NVIDIA GPUs a default-precision float32 matmul far above the FP32 (CUDA
core) figure shows it runs as TF32 on the tensor cores, which is why flops.py lists TF32 peaks.
On a CPU it also prints the CPU model and the float32 rates of XLA's and torch's matmuls on a
decoder MLP's shapes ([tokens, 1024] x [1024, 2816] forward, and the two backward products), the
comparison bench/simpo_vs_trl.py prints too (docs/throughput.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simpo_jax import flops  # noqa: E402


def matmul_rate(size: int, dtype, precision=None, repeats: int = 10) -> float:
    """Best FLOP/s of a jitted size^3 matmul on random data."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


MLP_SHAPE = (1024, 2816)  # the representative bench model's [hidden, intermediate]


def cpu_model() -> str:
    """The host's CPU model (/proc/cpuinfo's model name), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def dot_rates(tokens: int = 2048, shape=MLP_SHAPE, repeats: int = 5) -> dict:
    """{(library, product): float32 FLOP/s} of [tokens, K] x [K, N] (fwd), its input gradient
    [tokens, N] x [N, K] (dx) and weight gradient [K, tokens] x [tokens, N] (dw), jitted XLA
    against torch on its own threads."""
    import torch
    k, n = shape
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((tokens, k), (k, n), (tokens, n)))
    # torch as autograd runs them: a matmul of (transposed) views, no copies.
    products = {"fwd": ("tk,kn->tn", x, w, lambda a, b: a @ b),
                "dx": ("tn,kn->tk", g, w, lambda a, b: a @ b.T),
                "dw": ("tk,tn->kn", x, g, lambda a, b: a.T @ b)}
    flop = 2.0 * tokens * k * n
    rates = {}
    for name, (eq, a, b, torch_fn) in products.items():
        f = jax.jit(lambda u, v, eq=eq: jnp.einsum(eq, u, v))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        rates["xla", name] = flop / _best_seconds(lambda: f(ja, jb).block_until_ready(), repeats)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates["torch", name] = flop / _best_seconds(lambda: torch_fn(ta, tb), repeats)
    return rates


def dot_report(tokens: int = 2048, repeats: int = 5) -> str:
    """Lines: the CPU model and dot_rates in GFLOP/s, XLA against torch."""
    import torch
    rates = dot_rates(tokens, repeats=repeats)
    k, n = MLP_SHAPE
    parts = [f"{p} XLA {rates['xla', p] / 1e9:.1f} / torch {rates['torch', p] / 1e9:.1f}"
             for p in ("fwd", "dx", "dw")]
    return (f"CPU: {cpu_model()} ({os.cpu_count()} cores), torch {torch.get_num_threads()} threads, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n"
            f"float32 matmul GFLOP/s, [{tokens}, {k}] x [{k}, {n}] and its gradients: "
            + "; ".join(parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="small sizes, seconds")
    args = parser.parse_args()
    device = jax.devices()[0]
    size = 8192 if device.platform != "cpu" else 1024
    size = 256 if args.dry_run else size
    print(f"jax {jax.__version__}, device_kind {device.device_kind!r}, platform {device.platform}")
    for dtype in (jnp.bfloat16, jnp.float32):
        peak, source = flops.peak_flops_per_device(device, dtype)
        rate = matmul_rate(size, dtype)
        print(f"{jnp.dtype(dtype).name:>9}: MFU basis {peak / 1e12:7.1f} TFLOP/s ({source}); "
              f"measured {size}^3 matmul at default precision {rate / 1e12:7.1f} TFLOP/s "
              f"({rate / peak:.0%} of the basis)")
    rate = matmul_rate(size, jnp.float32, precision="highest")
    print(f"  float32 at precision 'highest': {rate / 1e12:7.1f} TFLOP/s")
    if device.platform == "cpu":
        print(dot_report(64 if args.dry_run else 2048, repeats=1 if args.dry_run else 5))


if __name__ == "__main__":
    main()
