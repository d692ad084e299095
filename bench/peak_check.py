"""The peak FLOP/s that MFU divides by, checked on the machine: datasheet figure against measured.

    python3 bench/peak_check.py         # on a GPU or TPU machine, ~1 min

For each compute dtype: simpo_jax.flops.peak_flops_per_device (the basis of the `mfu` metric) and
the measured rate of 8192^3 matmuls in that dtype at JAX's default precision, plus float32 at
'highest' precision. On NVIDIA GPUs a default-precision float32 matmul far above the FP32 (CUDA
core) figure shows it runs as TF32 on the tensor cores, which is why flops.py lists TF32 peaks.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

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


def main():
    device = jax.devices()[0]
    size = 8192 if device.platform != "cpu" else 1024
    print(f"jax {jax.__version__}, device_kind {device.device_kind!r}, platform {device.platform}")
    for dtype in (jnp.bfloat16, jnp.float32):
        peak, source = flops.peak_flops_per_device(device, dtype)
        rate = matmul_rate(size, dtype)
        print(f"{jnp.dtype(dtype).name:>9}: MFU basis {peak / 1e12:7.1f} TFLOP/s ({source}); "
              f"measured {size}^3 matmul at default precision {rate / 1e12:7.1f} TFLOP/s "
              f"({rate / peak:.0%} of the basis)")
    rate = matmul_rate(size, jnp.float32, precision="highest")
    print(f"  float32 at precision 'highest': {rate / 1e12:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()
