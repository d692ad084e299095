"""The three batch layouts as segment ids a kernel understands, with no [T, S] mask.

A kernel call masks by segment id (a query sees the keys of its own id, causally by index) and
optionally by a sliding window counted in indices. That covers padded rows (id 1 real, 0 padding)
and packed rows (the packer's segment ids) in one call. Shared-prompt rows
`[prompt | chosen | rejected]` (branch ids 0 / 1 / 2) take two calls on the same segment ids:
the row as it is, where prompt and chosen queries see exactly their keys (the rejected branch
comes after them), and the row reordered to `[prompt | rejected | chosen]` per segment, where
rejected queries see exactly the prompt and themselves; each query keeps the call that is exact
for it. In both orders the keys a query sees are contiguous with it, so index differences equal
position differences and an index window is the position window of layers.window_mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TILE = 128  # rows are padded to a multiple of the kernels' smallest tile (TPU lanes, GPU block)
PAD_ID = -1  # segment id of the padded tail: those queries see only each other


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowMask:
    """What a kernel masks by, in place of the [B, T, S] mask of layers.base_mask.

    ids_BT: segment id per token (equal ids see each other, causally); branch_ids_BT: shared-prompt
    rows' branches (0 prompt, 1 chosen, 2 rejected) or None; window: this layer's sliding window
    (a traced scalar of the layer scan) or None for global attention.
    """

    ids_BT: jax.Array
    branch_ids_BT: jax.Array | None = None
    window: jax.Array | None = None

    @classmethod
    def of(cls, attention_mask_BT, segment_ids_BT=None, branch_ids_BT=None) -> "RowMask":
        """The rows' mask from the batch: the packer's segment ids, else the padding mask."""
        ids = attention_mask_BT != 0 if segment_ids_BT is None else segment_ids_BT
        branches = None if branch_ids_BT is None else jnp.asarray(branch_ids_BT, jnp.int32)
        return cls(jnp.asarray(ids, jnp.int32), branches)

    def with_window(self, window) -> "RowMask":
        return dataclasses.replace(self, window=window)


def rejected_first(ids_BT, branch_ids_BT):
    """[B, T] gather order that moves each segment's rejected branch right after its prompt.

    Segments are contiguous runs of one id (the packer's rows), so a running count of id changes
    keeps them in place; inside a segment the stable sort orders prompt, rejected, chosen.
    """
    starts = jnp.concatenate([jnp.zeros_like(ids_BT[:, :1]), ids_BT[:, 1:] != ids_BT[:, :-1]],
                             axis=1)
    run = jnp.cumsum(starts, axis=1)
    order = jnp.where(branch_ids_BT == 0, 0, jnp.where(branch_ids_BT == 2, 1, 2))
    return jnp.argsort(run * 3 + order, axis=1, stable=True)


def gather_rows(x_BT, order_BT):
    """x reordered along T by order (x may have trailing axes)."""
    index = order_BT.reshape(order_BT.shape + (1,) * (x_BT.ndim - 2))
    return jnp.take_along_axis(x_BT, index, axis=1)


def pad_rows(t: int) -> int:
    """Row length the kernels run: t rounded up to a whole number of tiles."""
    return -(-t // TILE) * TILE


def block_size(t: int) -> int:
    """The kernels' query / key block for padded rows of t tokens: the largest of 512, 256, 128
    dividing t (larger blocks keep the MXU / tensor cores fed; 128 always divides)."""
    return next(b for b in (512, 256, TILE) if t % b == 0)


def layer_windows(windows, t: int) -> tuple[int, ...]:
    """The distinct sliding windows shorter than a row (a longer window hides nothing)."""
    return tuple(sorted({int(w) for w in windows if int(w) < t}))


def by_window(call, window, windows: tuple[int, ...]):
    """call(None) for global layers, call(w) for a layer of window w; the traced window picks
    the static kernel by lax.switch (each distinct window is compiled once)."""
    if window is None or not windows:
        return call(None)
    index = sum(jnp.where(window == w, i + 1, 0) for i, w in enumerate(windows))
    return jax.lax.switch(index, [lambda: call(None)] + [lambda w=w: call(w) for w in windows])
