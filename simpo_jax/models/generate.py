"""Decoding with a KV cache in one jitted loop: greedy here (sample generations during training);
simpo_jax/onpolicy/sampling.py passes its own token choice to the same `decode`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def left_pad(sequences, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> left-padded ids [B, T] and attention mask [B, T]; T = length, else the
    longest."""
    t = length or max(len(s) for s in sequences)
    ids = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask


def _prefill(model, ids_BT, mask_BT, s: int):
    """The prompt through the model into a cache of `s` slots: (logits, cache, positions, key
    validity, key positions, the sequence so far [B, s])."""
    b, t = ids_BT.shape
    positions = jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0).astype(jnp.int32)
    key_valid = jnp.zeros((b, s), bool).at[:, :t].set(mask_BT.astype(bool))
    key_positions = jnp.zeros((b, s), jnp.int32).at[:, :t].set(positions)
    logits, cache = model.forward_cached(ids_BT, positions, model.init_cache(b, s), 0, key_valid,
                                         key_positions)
    seq = jnp.zeros((b, s), jnp.int32).at[:, :t].set(ids_BT.astype(jnp.int32))
    return logits, cache, positions, key_valid, key_positions, seq


def decode(model, ids_BT, mask_BT, pick, *, max_new_tokens: int, eos_token_ids, pad_token_id):
    """The KV-cached decoding loop, for any token choice (call it inside jit).

    pick(logits [B, V], step) -> tokens [B] chooses token `step` (0-based) of every row: greedy
    here, sampling in simpo_jax/onpolicy/sampling.py. A row is done after any of eos_token_ids and
    continues with pad_token_id; the loop stops when every row is done. Returns (new tokens
    [B, max_new_tokens], number of new tokens per row [B], the EOS counted).
    """
    b, t = ids_BT.shape
    s = t + max_new_tokens
    logits, cache, positions, key_valid, key_positions, seq = _prefill(model, ids_BT, mask_BT, s)
    token = pick(logits[:, -1], 0)
    out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)
    eos = jnp.asarray(eos_token_ids, jnp.int32)
    # longrope (phi3): transformers' Phi3ForCausalLM drops its cache when the sequence reaches
    # original_max_position_embeddings + 1 tokens and encodes it all again (with the long
    # factors); the step that writes slot `after` does the same here.
    after = model.arch.long_rope_after if model.arch.long_inv_freq is not None else -1
    recompute = t <= after < s

    def step(token, pos, cache, slot, key_valid, key_positions, seq):
        logits, cache = model.forward_cached(token[:, None], pos[:, None], cache, slot, key_valid,
                                             key_positions)
        return logits[:, -1], cache

    def again(token, pos, cache, slot, key_valid, key_positions, seq):
        logits, cache = model.forward_cached(seq, key_positions, model.init_cache(b, s), 0,
                                             key_valid, key_positions)
        return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False), cache

    def cond(carry):
        i, done = carry[0], carry[7]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, pos, key_valid, key_positions, out, done, lengths, seq = carry
        out = out.at[:, i].set(jnp.where(done, pad_token_id, token))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        pos = pos + 1
        slot = t + i
        key_valid = key_valid.at[:, slot].set(True)
        key_positions = key_positions.at[:, slot].set(pos)
        seq = seq.at[:, slot].set(token)
        args = (token, pos, cache, slot, key_valid, key_positions, seq)
        if recompute:
            logits, cache = jax.lax.cond(slot == after, again, step, *args)
        else:
            logits, cache = step(*args)
        token = pick(logits, i + 1)
        return i + 1, cache, token, pos, key_valid, key_positions, out, done, lengths, seq

    carry = (jnp.int32(0), cache, token, positions[:, -1], key_valid, key_positions, out, done,
             lengths, seq)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[6], carry[8]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_id",
                                             "pad_token_id"))
def _generate(state, ids_BT, mask_BT, *, graphdef, max_new_tokens, eos_token_id, pad_token_id):
    def greedy(logits_BV, step):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    out, _ = decode(nnx.merge(graphdef, state), ids_BT, mask_BT, greedy,
                    max_new_tokens=max_new_tokens, eos_token_ids=(eos_token_id,),
                    pad_token_id=pad_token_id)
    return out


def greedy_generate(model, prompts, *, max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int) -> np.ndarray:
    """New tokens [B, max_new_tokens] for token-list prompts, as transformers' greedy `generate`:
    after EOS a row continues with pad_token_id."""
    ids, mask = left_pad(prompts, pad_token_id)
    graphdef, state = nnx.split(model)
    out = _generate(state, jnp.asarray(ids), jnp.asarray(mask), graphdef=graphdef,
                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id)
    if jax.process_count() > 1:  # every process takes part; each gets the whole result
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return np.asarray(out)
