"""Memory modes: bfloat16 master weights and AdamW moments that do not lose small updates.

Plain bfloat16 keeps 8 significant bits: an update smaller than 1/512 of a weight rounds away, and
SimPO's learning rates (3e-7 to 1e-6, Adam steps of about that size) are far below that for every
weight. Two stores that keep them, as optax transformations placed last in the chain (they turn
the update into "new bfloat16 value - old value", so `optax.apply_updates` lands on it exactly):

- `bfloat16_stochastic`: weights rounded up or down at random with the probabilities that make the
  rounding unbiased (2 bytes per parameter). Each weight's path is noisy at the scale of its
  bfloat16 spacing, but the expected update is the float32 one, and across many weights the
  direction of the update is kept.
- `bfloat16_kahan`: bfloat16 weights plus a bfloat16 compensation holding what the rounding left
  out (4 bytes per parameter, like float32 masters, but bfloat16 gradients, accumulators and
  no separate compute copy; updates are kept to about 16 significant bits).

AdamW's moments in bfloat16 (`optimizer_state_dtype`) are stored with stochastic rounding too: the
second moment moves by (1 - b2) = 0.1% of itself per step, under half of bfloat16's spacing, so
round-to-nearest would freeze it (tests/test_optim.py shows the frozen value).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from simpo_jax.config.choices import MasterWeights, StateDtype

MASTER_WEIGHTS = MasterWeights.values()
STATE_DTYPES = StateDtype.values()


def param_dtype(master_weights: str):
    """The dtype parameters are held in under a master_weights mode."""
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"master_weights={master_weights!r}; valid: {', '.join(MASTER_WEIGHTS)}.")
    return jnp.float32 if master_weights == "float32" else jnp.bfloat16


def stochastic_round(x, key):
    """float32 -> bfloat16, rounding up with probability (distance to the lower value) / spacing.

    Adds 16 random bits below bfloat16's last kept bit of the float32 pattern and truncates: the
    carry happens exactly that often. Unbiased: E[stochastic_round(x)] = x. The bits are a
    counter-based hash (murmur3's finaliser of element index and key), a few integer operations
    per element: threefry's bits made the bfloat16 modes' update 1.5x slower on CPU.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    seed = jax.random.bits(key, (), jnp.uint32)
    rounded = (bits + (_hash(_index(x.shape), seed) >> 16)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def _index(shape):
    """Row-major element index, built from per-axis iotas (partitions like any elementwise op)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def _hash(x, seed):
    x = x * jnp.uint32(0x9E3779B1) + seed
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _leaf_keys(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(1, len(leaves)))[:len(leaves)]
    return jax.tree.unflatten(treedef, list(keys))


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def to_float32() -> optax.GradientTransformation:
    """Gradients to float32 before clipping and Adam (bfloat16 masters give bfloat16 gradients)."""
    return optax.stateless(lambda updates, params=None: _f32(updates))


class LowPrecisionAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    key: jax.Array


def scale_by_adam(b1: float, b2: float, eps: float, state_dtype: str,
                  seed: int = 0) -> optax.GradientTransformation:
    """optax.scale_by_adam with the moments stored in `state_dtype`; float32 is optax's own."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"optimizer_state_dtype={state_dtype!r}; valid: "
                         f"{', '.join(STATE_DTYPES)}.")
    if state_dtype == "float32":
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)
        return LowPrecisionAdamState(jnp.zeros([], jnp.int32), zeros, zeros,
                                     jax.random.key_data(jax.random.key(seed)))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu,
                          _f32(updates))
        nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g),
                          state.nu, _f32(updates))
        c = count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / (1 - b1 ** c)) / (jnp.sqrt(v / (1 - b2 ** c)) + eps),
                           mu, nu)
        k_mu, k_nu = jax.random.split(key)
        mu = jax.tree.map(stochastic_round, mu, _leaf_keys(k_mu, mu))
        nu = jax.tree.map(stochastic_round, nu, _leaf_keys(k_nu, nu))
        return out, LowPrecisionAdamState(count, mu, nu, state.key)

    return optax.GradientTransformation(init, update)


class StochasticMasterState(NamedTuple):
    count: jax.Array
    key: jax.Array


def round_to_master(master_weights: str, seed: int = 0) -> optax.GradientTransformation:
    """Last in the chain: turns float32 updates into exact steps between bfloat16 values.

    float32 masters: the identity. The returned update u' makes p + u' (float32 sum of a bfloat16
    and an exact difference of bfloat16 values) equal the new bfloat16 weight exactly.
    """
    param_dtype(master_weights)
    if master_weights == "float32":
        return optax.identity()

    if master_weights == "bfloat16_stochastic":
        def init(params):
            del params
            return StochasticMasterState(jnp.zeros([], jnp.int32),
                                         jax.random.key_data(jax.random.key(seed + 1)))

        def update(updates, state, params):
            count = optax.safe_increment(state.count)
            key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
            new = jax.tree.map(lambda p, u, k: stochastic_round(p.astype(jnp.float32) + u, k),
                               params, _f32(updates), _leaf_keys(key, params))
            return (jax.tree.map(lambda n, p: n.astype(jnp.float32) - p.astype(jnp.float32),
                                 new, params), StochasticMasterState(count, state.key))

        return optax.GradientTransformation(init, update)

    def init_kahan(params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)

    def update_kahan(updates, compensation, params):
        exact = jax.tree.map(lambda p, u, c: p.astype(jnp.float32) + u + c.astype(jnp.float32),
                             params, _f32(updates), compensation)
        new = jax.tree.map(lambda s: s.astype(jnp.bfloat16), exact)
        compensation = jax.tree.map(lambda s, n: (s - n.astype(jnp.float32)).astype(jnp.bfloat16),
                                    exact, new)
        return (jax.tree.map(lambda n, p: n.astype(jnp.float32) - p.astype(jnp.float32),
                             new, params), compensation)

    return optax.GradientTransformation(init_kahan, update_kahan)


def master_value(params, opt_state, master_weights: str):
    """The weights a state stands for: bfloat16_kahan's are bfloat16 + compensation (float32).

    The compensation is the state of the chain's last transformation (optim.make_optimizer).
    """
    if master_weights != "bfloat16_kahan":
        return params
    return jax.tree.map(lambda p, c: p.astype(jnp.float32) + c.astype(jnp.float32), params,
                        opt_state[-1])
