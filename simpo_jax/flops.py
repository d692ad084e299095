"""Model FLOPs and the hardware peak: one count for the `mfu` metric and for --mode=plan.

Training FLOPs per token = 6 x N + 12 x layers x seq_len x (heads x head_dim), where N counts the
matmul parameters (attention and MLP projections of every layer plus the LM head; the input
embedding is a lookup, not a matmul), 6 = forward (2) + backward (4) FLOPs per parameter, and the
second term is the attention score (QK^T) and value (AV) matmuls over the full seq_len x seq_len
score matrix: the PaLM paper's convention (Chowdhery et al. 2022, appendix B), in which causal
masking is not discounted and rematerialised forward passes are not counted.

MFU divides by the peak of the compute dtype: the vendor's dense figure where one is listed for
that dtype, else a large matmul of that dtype measured on the device.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip from the vendors' datasheets, by compute dtype. TPU v4/v5p count one
# chip, not one core. NVIDIA float32: JAX's default matmul precision runs float32 matmuls as TF32
# on the tensor cores, so the TF32 figure applies. TPUs publish no float32 figure: measured.
# Longer names first where one is a prefix of another (startswith).
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},  # v5p
    "TPU v6 lite": {"bfloat16": 918e12},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12},
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM (H100 80GB HBM3)
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 495e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 156e12},
}


def non_embedding_params(arch) -> int:
    """Matmul parameters: attention and MLP projections of every layer plus the LM head."""
    d, f, e = arch.hidden_size, arch.intermediate_size, arch.head_dim
    attention = d * arch.num_heads * e * 2 + d * arch.num_kv_heads * e * 2
    mlp = 3 * d * f
    return arch.num_layers * (attention + mlp) + arch.vocab_size * d


def model_flops_per_token(arch, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward), see the module docstring."""
    attention = 12 * arch.num_layers * seq_len * arch.num_heads * arch.head_dim
    return 6.0 * non_embedding_params(arch) + attention


def model_flops(arch, tokens: int, seq_len: int) -> float:
    """Training FLOPs of `tokens` tokens in sequences of `seq_len`: the planner's per-step count."""
    return model_flops_per_token(arch, seq_len) * tokens


def measured_matmul_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5,
                          device=None) -> float:
    """Achieved FLOP/s of a jitted size^3 matmul in `dtype` on `device` (default: the first)."""
    a = jax.device_put(jnp.ones((size, size), dtype), device or jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops_per_device(device=None, dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s in the compute `dtype`, where the figure comes from) for one device."""
    device = device or jax.devices()[0]
    name = jnp.dtype(dtype).name
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={name!r}: the compute dtype must be bfloat16 or float32.")
    kind = getattr(device, "device_kind", "")
    for prefix, peaks in PEAK_FLOPS.items():
        if kind.startswith(prefix) and name in peaks:
            basis = "TF32 tensor cores, " if name == "float32" else ""
            return peaks[name], f"{kind} datasheet ({basis}{name} dense)"
    # CPUs run bfloat16 matmuls far below float32 (about 10 GFLOP/s on 2 cores): a smaller one.
    size = 8192 if device.platform != "cpu" else 2048 if name == "float32" else 1024
    return (measured_matmul_flops(size, dtype, device=device),
            f"{kind or device.platform}: measured {size}x{size} {name} matmul")
