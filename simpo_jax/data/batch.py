"""Typed batches of preference pairs (padded and packed rows) and their shardings.

Both keep chosen and rejected of a pair together along the batch axis, which shards over
data x fsdp. The step asks a batch what it is (isinstance), never which arrays it holds.
Fields are in alphabetical order: the leaf order of the dicts these batches replaced, so the
compiled step takes its arguments in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_jax import sharding as sharding_lib
from simpo_jax.data import LAYOUTS


@flax.struct.dataclass
class PaddedBatch:
    """B pairs right-padded to T tokens (numpy on the host, jax.Arrays on the devices).

    Scored tokens are [completion_start, lengths): the mask comes from positions, never from pad
    ids (pad may equal EOS).
    """

    completion_start: Any  # int32 [B, 2]: prompt length
    input_ids: Any  # int32 [B, 2, T]: index 0 = prompt + chosen, 1 = prompt + rejected
    lengths: Any  # int32 [B, 2]: prompt + completion length
    pair_mask: Any  # float32 [B]: 1 for a real pair, 0 for padding


@flax.struct.dataclass
class PackedBatch:
    """R rows of T tokens holding several pairs each (layouts packed and shared_prompt).

    P = max pairs per row; a score group of g rows pools its N scored slots per row (packed.py).
    """

    attention_blocks: Any  # int32 [R, M, 2]: (query block, key block) tiles to compute, -1 pads
    branch_ids: Any  # int32 [R, T]: 0 prompt (or a packed sequence), 1 chosen, 2 rejected
    completion_lengths: Any  # int32 [R, P, 2]
    input_ids: Any  # int32 [R, T]
    pair_mask: Any  # float32 [R, P]: 1 for a real pair slot
    positions: Any  # int32 [R, T]: position of each token in its own sequence
    prompt_lengths: Any  # int32 [R, P]
    score_index: Any  # int32 [R/g, g*N]: the hidden state predicting a scored token, k * T + index
    score_slot: Any  # int32 [R/g, g*N]: 2 * (k * P + pair slot) + side; -1 unused
    score_target: Any  # int32 [R/g, g*N]: the scored token
    segment_ids: Any  # int32 [R, T]: 0 = padding


class AbstractBatch(NamedTuple):
    """The global batch as ShapeDtypeStructs with shardings, and its pairs and tokens per step."""

    batch: PaddedBatch | PackedBatch
    pairs: int
    tokens: int


def batch_shardings(mesh: Mesh, layout: str = "padded") -> PaddedBatch | PackedBatch:
    """NamedShardings of each array: pairs (or rows) split over data x fsdp."""
    if layout not in LAYOUTS:
        raise ValueError(f"batch_layout={layout!r}; valid: {', '.join(LAYOUTS)}.")
    axes = sharding_lib.BATCH_AXES
    if layout != "padded":
        return PackedBatch(**{f.name: NamedSharding(mesh, P(axes))
                              for f in dataclasses.fields(PackedBatch)})
    return PaddedBatch(input_ids=NamedSharding(mesh, P(axes, None, None)),
                       completion_start=NamedSharding(mesh, P(axes, None)),
                       lengths=NamedSharding(mesh, P(axes, None)),
                       pair_mask=NamedSharding(mesh, P(axes)))



def abstract_arrays(shapes: dict, shardings):
    """{field: (shape, dtype)} -> the typed batch of `shardings`' type, as ShapeDtypeStructs."""
    return type(shardings)(**{name: jax.ShapeDtypeStruct(shape, dtype,
                                                         sharding=getattr(shardings, name))
                              for name, (shape, dtype) in shapes.items()})
