"""One decoder-only transformer for every supported family; differences live in ArchConfig.

Where the norms sit (norm_layout), per decoder layer:
    pre       x += attn(in_norm(x));            x += mlp(post_attn_norm(x))    llama, mistral, qwen
    sandwich  x += post_attn(attn(in_norm(x))); x += post_ff(mlp(pre_ff(x)))   gemma2
    post      x += post_attn(attn(x));          x += post_ff(mlp(x))           olmo2

Axis legend as in layers.py. Decoder layers are stored stacked (leading axis L) and applied with
jax.lax.scan, so compile time does not grow with depth; the per-layer sliding window is a
scanned input, so alternating local/global layers (gemma2) share one scanned block; so is the
index of the layer's RoPE table (gemma3's local layers have their own base).
Parameter paths mirror Hugging Face keys: `model.layers.self_attn.q_proj.weight` [L, H*E, D] is
HF `model.layers.{i}.self_attn.q_proj.weight` stacked over i.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from simpo_jax.config.choices import RematPolicy
import simpo_jax.models.kernels as kernels
import simpo_jax.models.layers as L  # not via the package, which imports this file

REMAT_POLICIES = ("none",) + RematPolicy.values()  # "none": no gradient_checkpointing
NORM_LAYOUTS = ("pre", "sandwich", "post")
QK_NORMS = (None, "head", "projection")


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Everything the forward pass needs to know about a checkpoint's architecture."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    inv_freq: tuple[float, ...]  # RoPE inverse frequencies [R/2], scaling already applied; R < E
    #                              rotates the first R dims of a head only (phi3 partial rotary)
    sliding_windows: tuple[int, ...]  # per layer; layers.NO_WINDOW for global attention
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    norm_kind: str = "llama"  # RMSNorm numerics, layers.NORM_KINDS
    norm_layout: str = "pre"  # pre | sandwich | post, see the module docstring
    qk_norm: str | None = None  # RMSNorm on q and k before RoPE: "head" (over E, qwen3) or
    #                             "projection" (over the whole H*E / K*E projection, olmo2)
    scale_embeddings: bool = False  # gemma2: embeddings times sqrt(hidden_size)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    initializer_range: float = 0.02
    # RoPE beyond one table. layer_rope: per layer 0 (inv_freq) or 1 (local_inv_freq), gemma3's
    # sliding layers with their own base. long_inv_freq: longrope's long factors, used instead of
    # inv_freq when the largest position + 1 of a forward pass exceeds long_rope_after
    # (transformers' rule, phi3). rope_scale multiplies cos and sin (longrope's attention factor).
    local_inv_freq: tuple[float, ...] | None = None
    layer_rope: tuple[int, ...] | None = None
    long_inv_freq: tuple[float, ...] | None = None
    long_rope_after: int = 0
    rope_scale: float = 1.0
    attention_impl: str = "auto"  # layers.ATTENTION_IMPLS (select_attention); not in config.json

    def __post_init__(self):
        if self.norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout={self.norm_layout!r}; valid: {', '.join(NORM_LAYOUTS)}.")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r}; valid: {QK_NORMS}.")
        if self.layer_rope is not None and (len(self.layer_rope) != self.num_layers or (
                max(self.layer_rope) > 0 and self.local_inv_freq is None)):
            raise ValueError(f"layer_rope={self.layer_rope} needs one entry per layer and "
                             "local_inv_freq for entries 1.")


class Attention(nnx.Module):
    def __init__(self, arch: ArchConfig, kw: dict):
        d, h, k, e = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_proj = L.Linear(d, h * e, bias=arch.qkv_bias, **kw)
        self.k_proj = L.Linear(d, k * e, bias=arch.qkv_bias, **kw)
        self.v_proj = L.Linear(d, k * e, bias=arch.qkv_bias, **kw)
        self.o_proj = L.Linear(h * e, d, bias=arch.o_bias, **kw)
        if arch.qk_norm is not None:
            per_head = arch.qk_norm == "head"
            norm = dict(eps=arch.rms_norm_eps, kind=arch.norm_kind, layers=kw["layers"],
                        dtype=kw["dtype"], param_dtype=kw["param_dtype"])
            self.q_norm = L.RMSNorm(e if per_head else h * e, **norm)
            self.k_norm = L.RMSNorm(e if per_head else k * e, **norm)
        self.arch = arch

    def __call__(self, x_BTD, cos, sin, mask_BTS, cache=None, blocks=None):
        """With cache=(k_BSKE, v_BSKE, index): this chunk's keys/values are written at slots
        [index, index + T), attention runs over all S slots, and (out, new cache) is returned.
        blocks: packed rows' visible (query block, key block) pairs (layers.attention)."""
        a = self.arch
        b, t, _ = x_BTD.shape
        q, k = self.q_proj(x_BTD), self.k_proj(x_BTD)
        if a.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, a.num_heads, a.head_dim)
        k = k.reshape(b, t, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        v = self.v_proj(x_BTD).reshape(b, t, a.num_kv_heads, a.head_dim)
        if cache is not None:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        scale = a.attn_scale if a.attn_scale is not None else a.head_dim ** -0.5
        if isinstance(mask_BTS, kernels.RowMask):  # hidden_states chose a kernel (splash, flash)
            out = kernels.attention(q, k, v, mask_BTS, kernel=self.kernel(q.dtype), scale=scale,
                                    softcap=a.attn_softcap, windows=a.sliding_windows)
        elif cache is None and L.select_attention(a.attention_impl, a.attn_softcap,
                                                  q.dtype) == "cudnn":
            out = L.cudnn_attention(q, k, v, mask_BTS, scale=scale)
        else:
            out = L.attention(q, k, v, mask_BTS, scale=scale, softcap=a.attn_softcap,
                              causal_blocks=cache is None, blocks_BM2=blocks)
        out = self.o_proj(out.reshape(b, t, a.num_heads * a.head_dim))
        return out if cache is None else (out, (k, v))

    def kernel(self, dtype) -> str:
        """The attention this model runs without a cache: xla | cudnn | splash | flash."""
        a = self.arch
        return L.select_attention(a.attention_impl, a.attn_softcap, dtype,
                                  windows=a.sliding_windows)


class MLP(nnx.Module):
    def __init__(self, arch: ArchConfig, kw: dict):
        d, f = arch.hidden_size, arch.intermediate_size
        self.gate_proj = L.Linear(d, f, bias=arch.mlp_bias, **kw)
        self.up_proj = L.Linear(d, f, bias=arch.mlp_bias, **kw)
        self.down_proj = L.Linear(f, d, bias=arch.mlp_bias, **kw)
        self.act = arch.hidden_act

    def __call__(self, x_BTD):
        return self.down_proj(L.ACTIVATIONS[self.act](self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nnx.Module):
    """One decoder layer; constructed with stacked [L, ...] parameters, applied one slice at a time."""

    def __init__(self, arch: ArchConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(layers=arch.num_layers, std=arch.initializer_range, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=arch.rms_norm_eps, kind=arch.norm_kind, layers=arch.num_layers,
                    dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(arch, kw)
        self.mlp = MLP(arch, kw)
        if arch.norm_layout != "post":
            self.input_layernorm = L.RMSNorm(arch.hidden_size, **norm)
        self.post_attention_layernorm = L.RMSNorm(arch.hidden_size, **norm)
        if arch.norm_layout == "sandwich":
            self.pre_feedforward_layernorm = L.RMSNorm(arch.hidden_size, **norm)
        if arch.norm_layout != "pre":
            self.post_feedforward_layernorm = L.RMSNorm(arch.hidden_size, **norm)
        self.layout = arch.norm_layout

    def __call__(self, x_BTD, cos, sin, mask_BTS, cache=None, blocks=None):
        attn_in = x_BTD if self.layout == "post" else self.input_layernorm(x_BTD)
        h = self.self_attn(attn_in, cos, sin, mask_BTS, cache, blocks)
        if cache is not None:
            h, cache = h
        if self.layout == "pre":  # post_attention_layernorm is the MLP's pre-norm here
            x_BTD = x_BTD + h
            out = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        else:
            x_BTD = x_BTD + self.post_attention_layernorm(h)
            mlp_in = self.pre_feedforward_layernorm(x_BTD) if self.layout == "sandwich" else x_BTD
            out = x_BTD + self.post_feedforward_layernorm(self.mlp(mlp_in))
        return out if cache is None else (out, cache)


class Decoder(nnx.Module):
    """HF `model`: embed_tokens, stacked layers, final norm."""

    def __init__(self, arch: ArchConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = L.Embed(arch.vocab_size, arch.hidden_size, std=arch.initializer_range,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = Block(arch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = L.RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps, kind=arch.norm_kind,
                              layers=None, dtype=dtype, param_dtype=param_dtype)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {"full": None,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "dots_saveable": jax.checkpoint_policies.dots_saveable}
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


class CausalLM(nnx.Module):
    """Decoder plus LM head (or the tied embedding). Call: logits [B, T, V] in float32."""

    def __init__(self, arch: ArchConfig, hf_config_dict: dict, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, seed: int = 0, remat_policy: str = "none",
                 source: str = ""):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}.")
        rngs = nnx.Rngs(seed)
        self.model = Decoder(arch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if arch.tie_word_embeddings else L.Linear(
            arch.hidden_size, arch.vocab_size, bias=False, layers=None,
            std=arch.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.arch = arch
        self.dtype = jnp.dtype(dtype)
        self.remat_policy = remat_policy
        self._hf_config_json = json.dumps(hf_config_dict, sort_keys=True)
        # The checkpoint folder loaded from: export copies the tensors we do not train (a
        # multimodal checkpoint's vision tower) from there.
        self.source = source

    @property
    def hf_config_dict(self) -> dict:
        """The config.json contents of this architecture."""
        return json.loads(self._hf_config_json)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                      branch_ids=None, attention_blocks=None):
        """Final-norm hidden states [B, T, D]; positions default to cumsum(mask) - 1 (any padding side).

        segment_ids (packed rows) keep attention inside a segment; branch_ids (shared-prompt rows)
        let each completion see the prompt but not the other completion (see layers.base_mask).
        attention_blocks [B, M, 2] (packed rows): the block pairs holding a visible key; attention
        computes only those (layers.block_sparse_attention).
        """
        a = self.arch
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        if (segment_ids is not None or branch_ids is not None) and positions is None:
            raise ValueError("segment_ids/branch_ids given without positions: packed rows need "
                             "explicit positions restarting at 0 in every segment.")
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
        positions = jnp.asarray(positions)
        if self.model.layers.self_attn.kernel(self.dtype) in kernels.KERNELS:  # no [B, T, S] mask
            row_mask = kernels.RowMask.of(attention_mask, segment_ids, branch_ids)
            layer_mask = row_mask.with_window
        else:
            mask_BTS = L.base_mask(attention_mask, segment_ids, branch_ids)
            layer_mask = lambda window: mask_BTS & L.window_mask(positions, window)  # noqa: E731
        cos, sin, rope_index = self._rope(positions)

        x = self._embed(input_ids)
        graphdef, stacked = nnx.split(self.model.layers)

        def body(x_BTD, xs):
            layer_state, window, r = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x_BTD, cos[r], sin[r], layer_mask(window), blocks=attention_blocks), None

        windows = jnp.asarray(a.sliding_windows, jnp.int32)
        x, _ = jax.lax.scan(_remat(body, self.remat_policy), x, (stacked, windows, rope_index))
        return self.model.norm(x)

    def _embed(self, input_ids_BT):
        """Token embeddings, scaled by sqrt(hidden_size) where the family does (Gemma)."""
        x = self.model.embed_tokens(input_ids_BT)
        if self.arch.scale_embeddings:
            x = x * jnp.asarray(self.arch.hidden_size ** 0.5, self.dtype)
        return x

    def _rope(self, positions_BT):
        """cos, sin [N, B, T, R] of the N RoPE tables and each layer's table index [L].

        The table is chosen per layer like the sliding window: a scanned input of the layer loop.
        """
        a = self.arch
        inv_freq = jnp.asarray(a.inv_freq, jnp.float32)
        if a.long_inv_freq is not None:  # transformers: max(position_ids) + 1 > original max
            long = jnp.max(positions_BT) + 1 > a.long_rope_after
            inv_freq = jnp.where(long, jnp.asarray(a.long_inv_freq, jnp.float32), inv_freq)
        tables = [inv_freq]
        if a.local_inv_freq is not None:
            tables.append(jnp.asarray(a.local_inv_freq, jnp.float32))
        cos_sin = [L.rope_cos_sin(positions_BT, t, self.dtype, a.rope_scale) for t in tables]
        index = jnp.asarray(a.layer_rope or (0,) * a.num_layers, jnp.int32)
        return (jnp.stack([c for c, _ in cos_sin]), jnp.stack([s for _, s in cos_sin]), index)

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty KV cache: k, v [L, B, S, K, E] in the compute dtype."""
        a = self.arch
        shape = (a.num_layers, batch, length, a.num_kv_heads, a.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def forward_cached(self, input_ids_BT, positions_BT, cache, index, key_valid_BS,
                       key_positions_BS):
        """Logits [B, T, V] of a chunk written to cache slots [index, index + T); new cache.

        A query sees the filled slots up to its own (key_valid_BS marks them; prompt padding is
        False) within the layer's sliding window, measured in positions.
        """
        a = self.arch
        t, s = input_ids_BT.shape[1], key_valid_BS.shape[1]
        q_slots = index + jnp.arange(t)
        mask_BTS = (jnp.arange(s)[None, None, :] <= q_slots[None, :, None]) & key_valid_BS[:, None, :]
        cos, sin, rope_index = self._rope(positions_BT)
        x = self._embed(input_ids_BT)
        graphdef, stacked = nnx.split(self.model.layers)

        def body(x_BTD, xs):
            layer_state, window, r, k_cache, v_cache = xs
            layer = nnx.merge(graphdef, layer_state)
            in_window = (positions_BT[:, :, None] - key_positions_BS[:, None, :]) < window
            x_BTD, (k_cache, v_cache) = layer(x_BTD, cos[r], sin[r], mask_BTS & in_window,
                                              (k_cache, v_cache, index))
            return x_BTD, (k_cache, v_cache)

        windows = jnp.asarray(a.sliding_windows, jnp.int32)
        x, (k, v) = jax.lax.scan(body, x, (stacked, windows, rope_index, cache["k"], cache["v"]))
        return self.logits_from_hidden(self.model.norm(x)), {"k": k, "v": v}

    def logits_from_hidden(self, h):
        """LM head (or tied embedding) in float32, then gemma2's final softcap."""
        h_ND = h.reshape(-1, h.shape[-1]).astype(self.dtype)  # 2-D, as layers.Linear
        logits = jnp.einsum("nd,vd->nv", h_ND, self.head_weight(),
                            preferred_element_type=jnp.float32).reshape(h.shape[:-1] + (-1,))
        cap = self.arch.final_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def head_weight(self):
        """The LM head (or tied embedding) W [V, D] in the compute dtype: logits = h W^T."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight[...].astype(self.dtype)
        return self.lm_head.kernel()

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                 branch_ids=None):
        h = self.hidden_states(input_ids, attention_mask, positions=positions,
                               segment_ids=segment_ids, branch_ids=branch_ids)
        return self.logits_from_hidden(h)
