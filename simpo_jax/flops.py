"""Model FLOPs per token and the hardware peak, for model-FLOP utilisation (MFU).

Model FLOPs per trained token = 6 × N + 12 × layers × seq_len × (heads × head_dim), where N counts
the non-embedding parameters including the LM head (the input embedding is a lookup, not a
matmul), 6 = forward (2) + backward (4) multiply-adds per parameter, and the second term is the
attention score and value matmuls (PaLM appendix B; causal masking is not discounted).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip (vendor figures); TPU v4/v5p count one chip, not one core.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
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


def measured_matmul_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large jitted matmul on the default device (the CPU's 'peak')."""
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops_per_device(device=None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for one device."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{kind} datasheet (bf16 dense)"
    return measured_matmul_flops(), f"{kind or device.platform}: measured 2048x2048 float32 matmul"
