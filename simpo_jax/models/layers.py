"""Building blocks in Hugging Face orientation: Linear, Embed, RMSNorm, RoPE, masked attention.

Axis legend: B batch, T query positions, S key positions, D hidden, H query heads, K key/value
heads, G query heads per key/value head (H = K*G), E head dim, F MLP width, V vocab, L layers.
Weights keep Hugging Face layouts: Linear [F_out, F_in] (or [L, F_out, F_in] when stacked),
embeddings [V, D], so checkpoint import and export never transpose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simpo_jax.config.choices import AttentionImplementation
from simpo_jax.attention_tiles import SPARSE_BLOCK
import simpo_jax.models.kernels as kernels

# Added to masked attention logits: finite, so fully masked (padding) rows give a uniform
# softmax instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NO_WINDOW = 2**30  # sliding window of a global-attention layer


def _normal(rngs: nnx.Rngs, shape, std: float, param_dtype):
    return nnx.initializers.normal(std)(rngs.params(), shape, param_dtype)


class Linear(nnx.Module):
    """y = x W^T + b with W [out, in]; `layers` adds a leading stacked-layer axis."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, layers: int | None,
                 std: float, dtype, param_dtype, rngs: nnx.Rngs):
        lead = () if layers is None else (layers,)
        self.weight = nnx.Param(_normal(rngs, lead + (out_features, in_features), std, param_dtype))
        self.bias = nnx.Param(jnp.zeros(lead + (out_features,), param_dtype)) if bias else None
        self.dtype = dtype
        # LoRA adapters (simpo_jax/lora.py): nnx.LoRAParam A [(L,) r, in] and B [(L,) out, r]
        # (PEFT's lora_A / lora_B layouts); y += (x A^T B^T) * lora_scale.
        self.lora_A = self.lora_B = nnx.data(None)
        self.lora_scale = 0.0
        # An int8 frozen LoRA base (lora.quantize_base): weight int8, W = weight * weight_scale
        # with one float32 scale per output row, [(L,) out, 1].
        self.weight_scale = nnx.data(None)

    def kernel(self):
        """W in the compute dtype (dequantised when the weight is stored int8)."""
        w = self.weight[...].astype(self.dtype)
        if self.weight_scale is not None:
            w = w * self.weight_scale[...].astype(self.dtype)
        return w

    def __call__(self, x, preferred_element_type=None):
        # A 2-D [tokens, in] matmul: XLA CPU runs the forward and both gradients of a [B, T, in]
        # einsum about 1.4x slower (measured on the bench's MLP).
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.einsum("ni,oi->no", x, self.kernel(), preferred_element_type=preferred_element_type)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.lora_A is not None:  # as PEFT: base output (bias included) + B(A(x)) * scale
            h = jnp.einsum("ni,ri->nr", x, self.lora_A[...].astype(self.dtype))
            y = y + jnp.einsum("nr,or->no", h, self.lora_B[...].astype(self.dtype)
                               ).astype(y.dtype) * jnp.asarray(self.lora_scale, y.dtype)
        return y.reshape(lead + (y.shape[-1],))


class Embed(nnx.Module):
    """Token embedding [V, D] (also the tied LM head: CausalLM.head_weight)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, std: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (vocab_size, hidden_size), std, param_dtype))
        self.dtype = dtype

    def __call__(self, ids_BT):
        return jnp.take(self.weight[...], ids_BT, axis=0).astype(self.dtype)


NORM_KINDS = ("llama", "gemma", "olmo2")


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with Hugging Face numerics, by `kind`: llama
    w * norm(x).to(dtype); gemma ((1 + w) * norm(x)) in fp32; olmo2 (w * norm(x)) in fp32.
    """

    def __init__(self, size: int, *, eps: float, kind: str, layers: int | None, dtype,
                 param_dtype):
        if kind not in NORM_KINDS:
            raise ValueError(f"RMSNorm kind={kind!r}; valid: {', '.join(NORM_KINDS)}.")
        lead = () if layers is None else (layers,)
        init = jnp.zeros if kind == "gemma" else jnp.ones
        self.weight = nnx.Param(init(lead + (size,), param_dtype))
        self.eps, self.kind, self.dtype = eps, kind, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.kind == "gemma":
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        if self.kind == "olmo2":
            return (w.astype(jnp.float32) * normed).astype(x.dtype)
        return w.astype(self.dtype) * normed.astype(x.dtype)


def rope_inv_freq(head_dim: int, rope: dict, *, long: bool = False) -> np.ndarray:
    """Inverse frequencies [R/2] in float32 for rope_type default / linear / llama3 / longrope, as
    transformers; R = int(head_dim * partial_rotary_factor) rotated dims (phi3), else head_dim.

    longrope: the short factors, or with long=True the long ones (transformers switches to them
    when the largest position + 1 exceeds original_max_position_embeddings, see rope_scale).
    """
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    base = np.float32(rope["rope_theta"])
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (base ** exponent)).astype(np.float32)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if kind == "longrope":
        factors = np.asarray(rope["long_factor" if long else "short_factor"], np.float32)
        return (np.float32(1.0) / (factors * (base ** exponent))).astype(np.float32)
    if kind == "llama3":
        factor = np.float32(rope["factor"])
        low, high = np.float32(rope["low_freq_factor"]), np.float32(rope["high_freq_factor"])
        old_len = np.float32(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type={kind!r} is not supported; supported: default, linear, llama3, "
                     "longrope.")


def rope_scale(rope: dict, max_position_embeddings: int) -> float:
    """The factor transformers multiplies cos and sin by: 1 except for longrope, where it is
    attention_factor, else sqrt(1 + ln(s) / ln(original)) for s = factor (default: max positions /
    original max positions) above 1."""
    if rope.get("rope_type", "default") != "longrope":
        return 1.0
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(positions_BT, inv_freq, dtype, scale: float = 1.0):
    """cos, sin [B, T, R] (halves repeated, as transformers' rotate_half convention), times scale."""
    freqs = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_BTNE, cos_BTR, sin_BTR):
    """Rotates the first R dims of each head (all when R == E; phi3's partial rotary otherwise)."""
    r = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTNE[..., :r], x_BTNE[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos_BTR[:, :, None, :] + rotated * sin_BTR[:, :, None, :]
    return out if r == x_BTNE.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


def base_mask(attention_mask_BT, segment_ids_BT=None, branch_ids_BT=None):
    """[B, T, S] bool: causal by index, key valid, and (with segments) same segment.

    branch_ids (shared-prompt rows: 0 = prompt, 1 = chosen, 2 = rejected, ...) let a token see
    keys of branch 0 and of its own branch only, so two completions share one encoded prompt.
    """
    t = attention_mask_BT.shape[1]
    idx = jnp.arange(t)
    mask = (idx[None, :] <= idx[:, None])[None] & (attention_mask_BT[:, None, :] != 0)
    if segment_ids_BT is not None:
        mask &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    if branch_ids_BT is not None:
        key_branch = branch_ids_BT[:, None, :]
        mask &= (key_branch == 0) | (key_branch == branch_ids_BT[:, :, None])
    return mask


def window_mask(positions_BT, window):
    """[B, T, S] bool: query i sees key j when pos_i - pos_j < window (transformers' semantics).

    Positions, not indices: in packed and shared-prompt rows the two differ.
    """
    return (positions_BT[:, :, None] - positions_BT[:, None, :]) < window


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, scale: float, softcap: float | None,
              causal_blocks: bool = False, blocks_BM2=None):
    """Masked grouped-query attention; float32 logits and softmax, output in the query dtype.

    causal_blocks (the mask is causal by index, T == S): queries go in blocks of
    causal_block_size(T), block j attending to keys [0, end of block j) only, which skips the
    masked upper triangle: (n + 1) / 2n of the full square's work for n blocks, same result.
    blocks_BM2 (packed rows, T == S): the (query block, key block) pairs of SPARSE_BLOCK tokens
    that hold a visible key, -1 for none; only those are computed (`block_sparse_attention`)
    when they are few enough to pay (`sparse_pays`, a static choice from the shapes), else the
    causal blocks run.
    """
    if blocks_BM2 is not None and sparse_pays(q_BTHE.shape[1], blocks_BM2.shape[1]):
        return block_sparse_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, blocks_BM2, scale=scale,
                                      softcap=softcap)
    t = q_BTHE.shape[1]
    block = causal_block_size(t)
    if not causal_blocks or block >= t:
        return _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, scale=scale, softcap=softcap)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outs.append(_attention(q_BTHE[:, start:end], k_BSKE[:, :end], v_BSKE[:, :end],
                               mask_BTS[:, start:end, :end], scale=scale, softcap=softcap))
    return jnp.concatenate(outs, axis=1)


# The tiles run when they are at most this fraction of the causal triangle's tiles; above it the
# causal query blocks are faster, their larger matmuls running about 3x the FLOP rate of 64 x 64
# tiles on XLA CPU (measured: rows of 768 tokens holding ~2.5 pairs list 50% of the triangle and
# run 1.5x slower as tiles; rows of 2048 / 4096 list 24% / 14% and run 2.0x / 3.5x faster).
SPARSE_MAX_FRACTION = 0.35


def sparse_pays(t: int, num_tiles: int) -> bool:
    """Whether `num_tiles` listed tiles of a T-token row beat its causal query blocks."""
    nb = -(-t // SPARSE_BLOCK)
    return num_tiles <= SPARSE_MAX_FRACTION * nb * (nb + 1) / 2


def block_sparse_attention(q_BTHE, k_BTKE, v_BTKE, mask_BTT, blocks_BM2, *, scale: float,
                           softcap: float | None):
    """`attention` over the listed (query block, key block) pairs of each row only.

    Packed rows see only their own segment (and a shared prompt), so most of the causal triangle
    is masked; blocks_BM2 [B, M, 2] lists the M block pairs of SPARSE_BLOCK tokens that hold a
    visible key (data/packed_rows.block_pairs; -1 pads). Keys outside them are masked anyway, so the
    result equals the dense masked softmax. Each pair's scores are one [b x b] tile; the softmax
    runs across the tiles of a query block, whose maxima and sums are gathered and summed by
    one-hot matmuls (exact: weights 0 and 1 at HIGHEST precision), which XLA runs far faster than
    scatters.
    """
    b, t, h, e = q_BTHE.shape
    kv, blk = k_BTKE.shape[2], SPARSE_BLOCK
    g, nb = h // kv, -(-t // blk)
    if nb * blk != t:  # pad to whole blocks: padded keys are masked, padded queries dropped
        pad = ((0, 0), (0, nb * blk - t), (0, 0), (0, 0))
        q_BTHE, k_BTKE, v_BTKE = (jnp.pad(x, pad) for x in (q_BTHE, k_BTKE, v_BTKE))
        mask_BTT = jnp.pad(mask_BTT, ((0, 0), (0, nb * blk - t), (0, nb * blk - t)))
    valid_BM = blocks_BM2[..., 0] >= 0
    qi_BM, ki_BM = jnp.maximum(blocks_BM2[..., 0], 0), jnp.maximum(blocks_BM2[..., 1], 0)
    hi = jax.lax.Precision.HIGHEST
    onehot_q = jax.nn.one_hot(qi_BM, nb, dtype=jnp.float32) * valid_BM[..., None]  # [B, M, n]
    onehot_k = jax.nn.one_hot(ki_BM, nb, dtype=q_BTHE.dtype) * valid_BM[..., None]
    # Head-major blocks, so every tile matmul has its batch axes (B, M, K) leading.
    q = (q_BTHE * jnp.asarray(scale, q_BTHE.dtype)).reshape(b, nb, blk, kv, g, e)
    q = jnp.einsum("bmn,bntkge->bmkgte", onehot_q.astype(q.dtype), q, precision=hi)
    k = jnp.einsum("bmn,bnske->bmkse", onehot_k, k_BTKE.reshape(b, nb, blk, kv, e), precision=hi)
    v = jnp.einsum("bmn,bnske->bmkse", onehot_k, v_BTKE.reshape(b, nb, blk, kv, e), precision=hi)
    logits = jnp.einsum("bmkgte,bmkse->bmkgts", q, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    tiles = mask_BTT.reshape(b, nb, blk, nb, blk).transpose(0, 1, 3, 2, 4).reshape(
        b, nb * nb, blk, blk)
    mask = jnp.take_along_axis(tiles, (qi_BM * nb + ki_BM)[:, :, None, None], axis=1)
    mask = (mask & valid_BM[:, :, None, None])[:, :, None, None]  # [B, M, 1, 1, t, s]
    logits = jnp.where(mask, logits, MASK_VALUE)
    # Row maxima over a query block's tiles (a stop-gradient shift: the softmax is invariant).
    tile_max = jax.lax.stop_gradient(logits.max(-1))  # [B, M, K, G, t]
    row_max = jnp.full((b, nb, kv, g, blk), MASK_VALUE, jnp.float32).at[
        jnp.arange(b)[:, None], qi_BM].max(tile_max)
    row_max = jnp.einsum("bmn,bnkgt->bmkgt", onehot_q, row_max, precision=hi)
    probs = jnp.where(mask, jnp.exp(logits - row_max[..., None]), 0.0)
    denom = jnp.einsum("bmn,bmkgt->bnkgt", onehot_q, probs.sum(-1), precision=hi)
    out = jnp.einsum("bmkgts,bmkse->bmkgte", probs.astype(v.dtype), v)
    out = jnp.einsum("bmn,bmkgte->bnkgte", onehot_q.astype(out.dtype), out, precision=hi)
    # A query with no visible key (padding) gets 0 rather than 0 / 0.
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None].astype(out.dtype)
    out = out.transpose(0, 1, 4, 2, 3, 5).reshape(b, nb * blk, h, e)  # [B, T, H, E]
    return out[:, :t].astype(q_BTHE.dtype)


def causal_block_size(t: int) -> int:
    """Query block of `attention`: at most 8 blocks, none under 128 tokens."""
    return max(128, -(-t // 8))


def _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, scale: float, softcap: float | None):
    b, t, h, e = q_BTHE.shape
    kv = k_BSKE.shape[2]
    q = (q_BTHE * jnp.asarray(scale, q_BTHE.dtype)).reshape(b, t, kv, h // kv, e)  # T x E, not T x S
    logits = jnp.einsum("btkge,bske->bkgts", q, k_BSKE, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask_BTS[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKE.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v_BSKE)
    return out.reshape(b, t, h, e)


ATTENTION_IMPLS = AttentionImplementation.values()


def select_attention(impl: str, softcap: float | None, dtype, *, windows=(),
                     platform: str | None = None) -> str:
    """The attention config attention_implementation `impl` runs: xla | cudnn | splash | flash.

    platform: where the arrays live (default: the context mesh's devices, else the default
    backend; kernels.platform), so a CPU host planning for a TPU mesh picks the TPU's kernel.
    auto: splash on TPU; on GPU cuDNN fused attention (jax.nn.dot_product_attention with the
    rows' mask) in 16-bit without logit soft-capping, which the H200 check measured fastest, else
    XLA; XLA on CPU. A named kernel runs or raises the reasons it cannot (on a CPU, splash and
    flash run in Pallas interpret mode).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_implementation={impl!r}; valid: {', '.join(ATTENTION_IMPLS)}.")
    on = platform or kernels.platform()
    if impl in kernels.KERNELS or (impl == "auto" and on == "tpu"):
        kernel = "splash" if impl == "auto" else impl
        why = kernels.reasons(kernel, softcap=softcap, windows=windows, on=on)
        if impl == kernel and why:
            raise ValueError(f"attention_implementation={impl!r} cannot run: " + "; ".join(why)
                             + ".")
        return "xla" if why else kernel
    reasons = []
    if on != "gpu":
        reasons.append(f"the backend is {on}, not gpu")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        reasons.append(f"compute dtype {jnp.dtype(dtype).name} is not 16-bit (set bf16=True)")
    if softcap is not None:
        reasons.append("the model soft-caps attention logits (Gemma 2)")
    if impl == "cudnn" and reasons:
        raise ValueError("attention_implementation='cudnn' cannot run: " + "; ".join(reasons) + ".")
    return "xla" if impl == "xla" or reasons else "cudnn"


def cudnn_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, scale: float):
    # Every query also sees itself, so padding rows are never fully masked (no NaN from cuDNN);
    # valid rows already see themselves.
    t = mask_BTS.shape[1]
    mask = mask_BTS | jnp.eye(t, dtype=bool)[None]
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask[:, None],
                                        scale=scale, implementation="cudnn")


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
