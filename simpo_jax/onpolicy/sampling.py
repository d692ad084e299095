"""Temperature / top-p sampling with a KV cache in one jitted loop, one PRNG stream per row.

The filters follow transformers' logits warpers in their order (TemperatureLogitsWarper, then
TopPLogitsWarper), which is also vLLM's order. Every row carries its own key, folded with the
step, so a row's answer depends only on its key and prompt, never on the batch it ran in: a
generation resumed from its shards, or regrouped, draws the same tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simpo_jax.models import generate

NEG_INF = -jnp.inf


def _order_keys(x):
    """uint32 keys that order float32 values as the floats order (-inf first)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    signed = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jax.lax.bitcast_convert_type(signed, jnp.uint32) ^ jnp.uint32(0x80000000)


def top_p_filter(logits_BV, top_p: float):
    """Logits with the tokens outside the nucleus set to -inf, as transformers' TopPLogitsWarper.

    Its rule: sorted ascending, a token goes while the probability mass up to and including it is
    <= 1 - top_p; the most probable token always stays. That mass only grows with the logit, so
    the removed tokens are those at or below one threshold logit, found here by bisection over the
    32-bit keys of the logits (32 masked sums over V) instead of a sort of V (an [B, 32k] sort
    costs ~10 ms a row on a CPU). Tokens with equal logits go or stay together (a sort would split
    them by position).
    """
    if top_p >= 1.0:
        return logits_BV
    probs = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    keys = _order_keys(logits_BV)
    limit = 1.0 - top_p

    def mass_upto(t_B):
        return jnp.sum(jnp.where(keys <= t_B[:, None], probs, 0.0), axis=-1)

    def halve(_, bounds):  # invariant: mass_upto(lo) <= limit < mass_upto(hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_upto(mid) <= limit
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    b = logits_BV.shape[0]
    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros((b,), jnp.uint32),
                                             jnp.full((b,), 0xFFFFFFFF, jnp.uint32)))
    remove = keys <= lo[:, None]
    best = jnp.argmax(logits_BV, axis=-1)
    remove = remove & (jnp.arange(logits_BV.shape[-1])[None, :] != best[:, None])
    return jnp.where(remove, NEG_INF, logits_BV)


def warp(logits_BV, temperature: float, top_p: float):
    """Float32 logits after temperature and top-p, ready for a categorical draw."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    return top_p_filter(logits_BV, top_p)


def draw(logits_BV, keys_B):
    """One token per row from softmax(logits) by inverse CDF: one uniform number per row.

    The first token whose cumulative probability reaches u * total; a token of probability 0
    (outside the nucleus) spans no interval, so it is never drawn. One uniform per row instead of
    jax.random.categorical's Gumbel noise over the whole vocabulary (V random numbers per row, the
    larger cost of a sampling step on a CPU).
    """
    probs = jax.nn.softmax(logits_BV, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    u = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)  # (0, 1]
    target = u * cumulative[:, -1]
    token = jnp.sum(cumulative < target[:, None], axis=-1)
    return jnp.minimum(token, logits_BV.shape[-1] - 1).astype(jnp.int32)


def next_tokens(logits_BV, keys_B, step, *, temperature: float, top_p: float):
    """One token per row: argmax at temperature 0, else a draw from the warped distribution."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    warped = warp(logits_BV, temperature, top_p)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    return draw(warped, step_keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_ids",
                                             "pad_token_id", "temperature", "top_p"))
def _sample(state, ids_BT, mask_BT, keys_B, *, graphdef, max_new_tokens, eos_token_ids,
            pad_token_id, temperature, top_p):
    """(new tokens [B, N] padded with pad_token_id after EOS, number of new tokens per row [B])."""
    def pick(logits_BV, step):
        return next_tokens(logits_BV, keys_B, step, temperature=temperature, top_p=top_p)

    return generate.decode(nnx.merge(graphdef, state), ids_BT, mask_BT, pick,
                           max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                           pad_token_id=pad_token_id)


def stop_ids(eos_token_id) -> tuple[int, ...]:
    """An EOS id or several (generation_config.json's list, e.g. Gemma-2-it's <eos> and
    <end_of_turn>) as a sorted tuple."""
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    return tuple(sorted({int(i) for i in ids}))


def row_keys(seeds, salts) -> np.ndarray:
    """Per-row PRNG keys [B, 2] (uint32): PRNGKey(seed) folded with a per-row salt (a prompt id)."""
    seeds = jnp.asarray(np.asarray(seeds, np.int64) & 0x7FFFFFFF, jnp.uint32)
    salts = jnp.asarray(np.asarray(salts, np.int64) & 0x7FFFFFFF, jnp.uint32)
    return np.asarray(jax.vmap(lambda s, x: jax.random.fold_in(jax.random.PRNGKey(s), x))(
        seeds, salts))


def sample(model, prompts, keys, *, max_new_tokens: int, eos_token_id, pad_token_id: int,
           temperature: float, top_p: float, mesh=None, prompt_length: int | None = None,
           batch_rows: int | None = None) -> list[list[int]]:
    """New tokens per prompt (EOS kept when drawn, nothing after it), one PRNG key per prompt.

    eos_token_id: one id or several; a row stops at the first of them it draws.

    prompt_length pads every prompt to that many tokens (fewer compiled shapes); batch_rows pads
    the batch with dummy rows to that many (a multiple of the mesh's data-parallel size).
    With a mesh, rows are split over data x fsdp and the parameters keep their shardings.
    """
    n = len(prompts)
    length = prompt_length or max(len(p) for p in prompts)
    rows = batch_rows or n
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = -(-rows // dp) * dp
    prompts = list(prompts) + [prompts[0]] * (rows - n)
    keys = np.concatenate([np.asarray(keys, np.uint32),
                           np.repeat(np.asarray(keys[:1], np.uint32), rows - n, axis=0)])
    ids, mask = generate.left_pad(prompts, pad_token_id, length)
    graphdef, state = nnx.split(model)
    arrays = (ids, mask, keys)
    if mesh is not None:
        from simpo_jax import sharding as sharding_lib

        arrays = tuple(jax.make_array_from_callback(
            a.shape, sharding_lib.batch_sharding(mesh, a.ndim), lambda idx, a=a: a[idx])
            for a in arrays)
    out, lengths = _sample(state, *arrays, graphdef=graphdef, max_new_tokens=max_new_tokens,
                           eos_token_ids=stop_ids(eos_token_id), pad_token_id=pad_token_id,
                           temperature=float(temperature), top_p=float(top_p))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out, lengths = (multihost_utils.process_allgather(x, tiled=True) for x in (out, lengths))
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [list(map(int, out[i, :lengths[i]])) for i in range(n)]
