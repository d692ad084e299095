"""Flash attention for GPUs (jax.experimental.pallas.ops.gpu.attention.mha), one call over
segment ids: causal by index, segment ids shared by queries and keys (rows.py's layouts need no
more). The kernel has no logit soft-cap, no sliding window and no grouped heads: soft-capped or
windowed models are refused (kernels.reasons), and key/value heads are repeated to the query
heads before the call (the kernel's [B, T, H, E] layout indexes both by the query head).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention

from simpo_jax.models.kernels.rows import block_size


def flash_call(q_BTHE, k_BTKE, v_BTKE, ids_BT, *, window: int | None, softcap: float | None,
               interpret: bool):
    """[B, T, H, E] attention of pre-scaled queries; T a whole number of rows.TILE."""
    if window is not None or softcap is not None:  # kernels.reasons refuses these first
        raise ValueError("flash attention has no sliding window or logit soft-cap.")
    t, h, kv = q_BTHE.shape[1], q_BTHE.shape[2], k_BTKE.shape[2]
    k_BTHE, v_BTHE = (jnp.repeat(x, h // kv, axis=2) for x in (k_BTKE, v_BTKE))
    blk = min(block_size(t), 128)  # Triton's forward tile; the backward keeps its 32s
    blocks = gpu_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=32, block_kv_dkv=32,
                                      block_q_dq=32, block_kv_dq=32)
    return gpu_attention.mha(q_BTHE, k_BTHE, v_BTHE, ids_BT, sm_scale=1.0, causal=True,
                             block_sizes=blocks, interpret=interpret)
