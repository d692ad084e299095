"""LM head statistics per scored token, log p(target) and mean logit, with a hand-written VJP.

Same values as plain autodiff of

    logits = tanh(h W^T / cap) * cap     (float32; no tanh without a final soft-cap)
    logp   = logits[n, t_n] - logsumexp_v(logits[n, v]),   mean_logit = mean_v(logits[n, v])

with fewer passes over [N, V]: without a soft-cap the mean logit is h . mean_v(W_v) (no pass
over V); the backward applies d logits = g (onehot(t) - softmax) as a dense softmax block feeding
two matmuls plus a row gather / row scatter-add for the one-hot part, never an [N, V] one-hot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def token_logps(h_ND, w_VD, targets_N, *, final_softcap=None, chunk_size=0):
    """-> (logp [N] float32 with gradient to h and W, mean_logit [N] float32, no gradient).

    logits = h_ND @ w_VD^T in float32, then tanh(logits / cap) * cap when final_softcap is set.
    chunk_size > 0 (and < N): [chunk_size, V] logits at a time, recomputed in the backward pass;
    0: the [N, V] float32 logits are kept for the backward pass instead of recomputed.
    """
    n = h_ND.shape[0]
    chunk = 0 if not chunk_size or chunk_size >= n else int(chunk_size)
    cap = None if final_softcap is None else float(final_softcap)
    return _token_logps(cap, chunk, h_ND, w_VD, targets_N)


def _dot(a, b, contract):
    """dot_general with float32 results and no batch axes; a and b keep their dtypes."""
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32)


def _capped(raw, cap):
    return raw if cap is None else jnp.tanh(raw / cap) * cap


def _cap_grad(logits, cap):
    """d capped / d raw from the capped logits: 1 - tanh^2."""
    return None if cap is None else 1.0 - jnp.square(logits / cap)


def _chunked(x_N, chunk):
    """[N, ...] -> [K, chunk, ...], K = ceil(N / chunk), zero-padded; chunk k holds rows c*K + k.

    Strided rather than contiguous chunks: a leading N axis sharded over devices keeps every
    chunk spread over all of them, so each step of the loop runs on every device.
    """
    k = -(-x_N.shape[0] // chunk)
    x = jnp.pad(x_N, [(0, k * chunk - x_N.shape[0])] + [(0, 0)] * (x_N.ndim - 1))
    return x.reshape(chunk, k, *x_N.shape[1:]).swapaxes(0, 1)


def _unchunked(x_K, n):
    """Inverse of _chunked: [K, chunk, ...] -> [N, ...]."""
    return x_K.swapaxes(0, 1).reshape(-1, *x_K.shape[2:])[:n]


def _target_logits(h_ND, w_VD, targets_N, cap):
    """Capped logits[n, t_n] by a row gather of W: its gradient touches N rows of W."""
    rows_ND = jnp.take(w_VD, targets_N, axis=0).astype(h_ND.dtype)
    raw = lax.dot_general(h_ND, rows_ND, (((1,), (1,)), ((0,), (0,))),
                          preferred_element_type=F32)
    return _capped(raw, cap), rows_ND


def _logsumexp_parts(logits_NV):
    """jax.nn.logsumexp's steps: (exp(logits - max), its sum over V, logsumexp)."""
    max_N = jnp.max(logits_NV, axis=-1)
    max_N = jnp.where(jnp.isfinite(max_N), max_N, 0.0)
    exp_NV = jnp.exp(logits_NV - max_N[:, None])
    sum_N = exp_NV.sum(-1)
    return exp_NV, sum_N, jnp.log(sum_N) + max_N


def _forward(cap, chunk, h_ND, w_VD, targets_N):
    """-> (logp, mean_logit, what the backward pass keeps of the [N, V] block or None, lse,
    soft-cap derivative at the target or None)."""
    n = h_ND.shape[0]
    mean_N = None
    saved = None
    if chunk == 0:
        logits_NV = _capped(_dot(h_ND, w_VD, ((1,), (1,))), cap)
        exp_NV, sum_N, lse_N = _logsumexp_parts(logits_NV)
        # Kept for the backward pass, which then needs neither the matmul nor exp again (on CPU
        # the [N, V] matmul costs more than storing); the capped logits for the cap derivative.
        saved = (exp_NV, sum_N, None if cap is None else logits_NV)
        if cap is not None:
            mean_N = logits_NV.mean(-1)
    else:
        def one(h_CD):
            logits = _capped(_dot(h_CD, w_VD, ((1,), (1,))), cap)
            return jax.nn.logsumexp(logits, axis=-1), (None if cap is None else logits.mean(-1))

        lse_K, mean_K = lax.map(one, _chunked(h_ND, chunk))
        lse_N = _unchunked(lse_K, n)
        if cap is not None:
            mean_N = _unchunked(mean_K, n)
    if cap is None:  # mean_v(h . W_v) = h . mean_v(W_v)
        mean_N = _dot(h_ND.astype(F32), w_VD.astype(F32).mean(0), ((1,), (0,)))
    picked_N, _ = _target_logits(h_ND, w_VD, targets_N, cap)
    return picked_N - lse_N, mean_N, saved, lse_N, _cap_grad(picked_N, cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _token_logps(cap, chunk, h_ND, w_VD, targets_N):
    logp_N, mean_N, *_ = _forward(cap, chunk, h_ND, w_VD, targets_N)
    return logp_N, mean_N


def _token_logps_fwd(cap, chunk, h_ND, w_VD, targets_N):
    logp_N, mean_N, saved, lse_N, pick_grad_N = _forward(cap, chunk, h_ND, w_VD, targets_N)
    res = (h_ND, w_VD, targets_N, saved, lse_N, pick_grad_N)
    return (logp_N, mean_N), res


def _softmax_grad(probs_NV, logits_NV, g_N, cap):
    """The softmax part of d loss / d raw logits: -g softmax (times the soft-cap derivative)."""
    d_NV = -g_N[:, None] * probs_NV
    return d_NV if cap is None else d_NV * _cap_grad(logits_NV, cap)


def _token_logps_bwd(cap, chunk, res, cts):
    h_ND, w_VD, targets_N, saved, lse_N, pick_grad_N = res
    g_N = cts[0].astype(F32)  # mean_logit's cotangent is dropped: it carries no gradient
    if chunk == 0:
        exp_NV, sum_N, logits_NV = saved
        d_NV = _softmax_grad(exp_NV, logits_NV, g_N / sum_N, cap)
        dh_ND = _dot(d_NV, w_VD, ((1,), (0,)))
        dw_VD = _dot(d_NV, h_ND, ((0,), (0,)))
    else:
        def one(dw_VD, xs):
            h_CD, lse_C, g_C = xs
            logits = _capped(_dot(h_CD, w_VD, ((1,), (1,))), cap)
            d_CV = _softmax_grad(jnp.exp(logits - lse_C[:, None]), logits, g_C, cap)
            return (dw_VD + _dot(d_CV, h_CD, ((0,), (0,))),
                    _dot(d_CV, w_VD, ((1,), (0,))))

        xs = tuple(_chunked(x, chunk) for x in (h_ND, lse_N, g_N))
        dw_VD, dh_K = lax.scan(one, jnp.zeros(w_VD.shape, F32), xs)
        dh_ND = _unchunked(dh_K, h_ND.shape[0])
    # The one-hot part: + g (times the soft-cap derivative at the target) on row t_n.
    gt_N = g_N if pick_grad_N is None else g_N * pick_grad_N
    rows_ND = jnp.take(w_VD, targets_N, axis=0).astype(F32)
    dh_ND = dh_ND + gt_N[:, None] * rows_ND
    dw_VD = dw_VD.at[targets_N].add(gt_N[:, None] * h_ND.astype(F32))
    return dh_ND.astype(h_ND.dtype), dw_VD.astype(w_VD.dtype), None


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)
