"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention), one call over segment ids.

Causal by index (CausalMask) or within a window (LocalMask: a query at i sees keys i - w + 1 ..
i), segment ids for the rows' structure (rows.py), Gemma 2's logit soft-cap in the kernel, GQA
natively (K key/value heads serve H query heads). The kernel skips the blocks its static mask
hides (above the diagonal, outside the window); blocks other segments fill are computed and
masked, as in MaxText.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from simpo_jax.models.kernels.rows import block_size


def splash_call(q_BTHE, k_BTKE, v_BTKE, ids_BT, *, window: int | None, softcap: float | None,
                interpret: bool):
    """[B, T, H, E] attention of pre-scaled queries; T a whole number of rows.TILE."""
    b, t, h, _ = q_BTHE.shape
    shape = (t, t)
    mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    blk = block_size(t)
    blocks = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                           block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                           block_kv_dq=blk)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([mask] * h), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)

    def one_row(q_HTE, k_KTE, v_KTE, ids_T):
        return kernel(q_HTE, k_KTE, v_KTE, sa.SegmentIds(ids_T, ids_T))

    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, N, E] <-> [B, N, T, E]
    out = jax.vmap(one_row)(heads_first(q_BTHE), heads_first(k_BTKE), heads_first(v_BTKE), ids_BT)
    return heads_first(out)
