"""Checksums of a train state's arrays, computed on device: saved with a checkpoint, checked on restore.

Each element's bits, as 32-bit words, are mixed with their position by a bijection (murmur3's
finaliser) and summed modulo 2**32. The sum is exact in any order, so a checksum depends on the
global values only, not on the mesh or on how many processes hold the shards; a bijection per
position means any one changed word changes the sum, and several change it except by a 2**-32
chance. A plain float sum would miss swapped or compensating values and NaN payloads.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr

ALGORITHM = "fmix32-position-sum-v1"  # saved beside the checksums: a new scheme gets a new name
_GOLDEN = np.uint32(0x9E3779B9)  # odd, so multiplying positions by it keeps them distinct


def checksums(state: Any) -> dict[str, int]:
    """{leaf path: checksum} of every array in `state`; every process gets the same numbers.

    One program sums all the leaves that live on one set of devices, and each program's sums are
    read before the next starts. One program per leaf, all dispatched at once, put dozens of
    independent programs with cross-device reductions in flight, and XLA's CPU runtime can
    deadlock on those (each device waiting at another program's rendezvous) and abort.
    """
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    groups: dict[frozenset, list[tuple[str, jax.Array]]] = {}
    for path, x in leaves:
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        groups.setdefault(frozenset(x.sharding.device_set), []).append((keystr(path), x))
    out = {}
    for group in groups.values():
        arrays = [x for _, x in group]
        sums = _checksum_all(arrays, tuple(_read_from(x) for x in arrays))
        out.update((path, int(np.asarray(s))) for (path, _), s in zip(group, sums))
    return {keystr(path): out[keystr(path)] for path, _ in leaves}


def _read_from(x: jax.Array):
    """The device sharding an offloaded (pinned host) array is read through, else None."""
    sharding = x.sharding
    if getattr(sharding, "memory_kind", None) == "pinned_host":
        return sharding.with_memory_kind("device")
    return None


@functools.partial(jax.jit, static_argnums=1)
def _checksum_all(arrays: list[jax.Array], read_from: tuple) -> list[jax.Array]:
    return [_checksum_of(x if to is None else jax.device_put(x, to))
            for x, to in zip(arrays, read_from)]


def _checksum_of(x: jax.Array) -> jax.Array:
    words = _words(x)
    position = _flat_position(words.shape)
    return jnp.sum(_fmix32(words ^ (position * _GOLDEN)), dtype=jnp.uint32)


def _words(x: jax.Array) -> jax.Array:
    """`x`'s bits as uint32: one word per element of 4 bytes or less, a trailing axis for wider."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size < 4:
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2


def _flat_position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2**32), built per axis so no reshape moves shards."""
    position, stride = jnp.zeros((), jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride = (stride * shape[axis]) % 2**32
    return position


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)
