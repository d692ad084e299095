"""One interface to a run's batches, whatever their layout: the Batcher, and the factory that
picks the padded or packed one from the config."""

from __future__ import annotations

from typing import Protocol

from simpo_jax.data import feed
from simpo_jax.data.batch import AbstractBatch, PackedBatch, PaddedBatch
from simpo_jax.data.packed import PackedBatcher
from simpo_jax.data.padded import PaddedBatcher


class Batcher(Protocol):
    """Training batches of one layout. Built with the data for a run, without it (abstract
    batches only) for the planner."""

    layout: str  # config.batch_layout
    steps_per_epoch: int
    shardings: PaddedBatch | PackedBatch  # a NamedSharding per array
    meta: dict | None  # the checkpoint meta "packing": a resume compares it
    description: str  # the start-up line: the layout and its fill (real / computed tokens)

    def batches(self, start_step: int = 0) -> feed.prefetch:
        """This process's device batches from global step start_step on, prefetched."""

    def abstract_batch(self) -> AbstractBatch:
        """The global batch as ShapeDtypeStructs with shardings; its pairs and tokens per step."""


def make_batcher(config, mesh, data=None) -> Batcher:
    """The config's batcher on `mesh`; data: the run's PreferenceData, or None for the planner."""
    if config.batch_layout == "padded":
        return PaddedBatcher.from_config(config, mesh, data)
    return PackedBatcher.from_config(config, mesh, data)
