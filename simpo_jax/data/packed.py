"""Padding-free pair batches: fixed-length rows holding several pairs; order a pure function of (seed, step).

Layouts (config `batch_layout`; "padded" is padded.py):
  packed:        [prompt+chosen][prompt+rejected] per pair, each sequence its own segment;
  shared_prompt: [prompt | chosen | rejected] per pair, one segment, branch ids 0 / 1 / 2, so each
                 completion sees the prompt (encoded once) and never the other completion; the
                 rejected positions restart at len(prompt).
Both keep chosen and rejected of a pair in one row, so rows shard over the batch axes like pairs.
The row batch: packed_rows.py.

A step is a fixed number of rows, so the number of pairs per step varies; the loss is the mean
over the step's pairs, exactly as in the padded layout. Each epoch shuffles the pairs, packs them
first-fit-decreasing inside windows of WINDOW_PAIRS, shuffles the rows and cuts them into steps; the
last step of an epoch is filled with empty rows, so every pair is trained once per epoch.
config.group_by_length applies to padded batches only: packed rows are filled by length inside
their windows and then shuffled, so a packed step mixes lengths either way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simpo_jax import sharding as sharding_lib
from simpo_jax.data import feed
from simpo_jax.data.batch import AbstractBatch, PackedBatch, abstract_arrays, batch_shardings
from simpo_jax.data.packed_rows import (block_pairs, block_width, check_layout, make_rows,
                                        max_block_pairs, row_score_width, score_groups,
                                        scored_count)
from simpo_jax.errors import UserError

WINDOW_PAIRS = 1024  # pairs packed together: larger packs tighter, smaller shuffles more


@dataclasses.dataclass(frozen=True)
class PackedBatcher:
    """The Batcher of the packed layouts: `global_rows` rows of `row_length` tokens per step."""

    mesh: Any
    layout: str  # packed | shared_prompt
    row_length: int
    rows_per_device: int  # per micro-batch
    max_pairs_per_row: int
    accumulation_steps: int
    seed: int
    pairs: Any  # TokenizedPairs; None: abstract batches only (the planner)
    pad_id: int | None  # None with pairs None

    @classmethod
    def from_config(cls, config, mesh, data=None) -> "PackedBatcher":
        """Row length and rows per device of the config; with data, checked against it (every
        pair fits a row) and pack_rows_per_device = 0 sized from its mean pair length; without,
        pack_rows_per_device or per_device_train_batch_size (one full-length pair per row)."""
        layout, row_length = config.batch_layout, config.pack_row_length or 2 * config.max_length
        rows = config.pack_rows_per_device or config.per_device_train_batch_size
        if data is not None:
            items = check_row_length(data.train, layout, row_length)
            rows = config.pack_rows_per_device or max(1, math.ceil(
                config.per_device_train_batch_size * items.mean() / (0.95 * row_length)))
        batcher = cls(mesh=mesh, layout=layout, row_length=int(row_length),
                      rows_per_device=int(rows), max_pairs_per_row=config.pack_max_pairs_per_row,
                      accumulation_steps=config.gradient_accumulation_steps, seed=config.seed,
                      pairs=None if data is None else data.train,
                      pad_id=None if data is None else data.pad_id)
        if data is not None and batcher.global_rows % jax.process_count():
            raise UserError(f"{batcher.global_rows} packed rows per step do not split over "
                            f"{jax.process_count()} processes: set config.pack_rows_per_device.")
        return batcher

    @property
    def global_rows(self) -> int:
        return (self.rows_per_device * sharding_lib.data_parallel_size(self.mesh)
                * self.accumulation_steps)

    @property
    def meta(self) -> dict:
        """The checkpoint's "packing": a resume with other rows would train other steps."""
        return {"layout": self.layout, "row_length": self.row_length,
                "rows_per_device": self.rows_per_device, "global_rows": int(self.global_rows),
                "max_pairs_per_row": self.max_pairs_per_row}

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        """Steps of the first epoch (later ones vary a little: their packing differs)."""
        return len(epoch_plan(item_lengths(self.pairs, self.layout), epoch=0, **self._plan_args))

    @property
    def description(self) -> str:
        """The start-up line: the layout, its rows, pairs per step and fill."""
        return (f"{self.layout} batches: {self.rows_per_device} rows of {self.row_length} tokens "
                f"per device per micro-batch, {self.global_rows} rows per step, "
                f"{self.pairs.num_pairs / self.steps_per_epoch:.1f} pairs per step on average; "
                f"fill {self.fill():.0%} (real tokens / computed ones, first epoch)")

    def fill(self) -> float:
        """Tokens of the first epoch's pairs / the row slots of its steps (empty rows included)."""
        tokens = item_lengths(self.pairs, self.layout).sum()
        return float(tokens / (self.steps_per_epoch * self.global_rows * self.row_length))

    @property
    def shardings(self) -> PackedBatch:
        return batch_shardings(self.mesh, self.layout)

    @property
    def _plan_args(self) -> dict:
        return dict(global_rows=self.global_rows, row_length=self.row_length,
                    max_pairs_per_row=self.max_pairs_per_row, seed=self.seed)

    def batches(self, start_step: int = 0) -> feed.prefetch:
        """This process's device batches from global step start_step on, prefetched."""
        return feed.prefetch(self.local_batches(start_step), self.shardings)

    def local_batches(self, start_step: int = 0):
        """This process's numpy row batches from global step start_step on.

        Score groups: the rows one device computes in one micro-batch pool their scored tokens
        (packed_rows.score_groups), unless a process's rows are not whole groups.
        """
        rows_per_process = self.global_rows // jax.process_count()
        group = self.rows_per_device
        group = group if rows_per_process % (group * self.accumulation_steps) == 0 else 1
        return row_batches(self.pairs, layout=self.layout, rows_per_process=rows_per_process,
                           row_length=self.row_length, max_pairs_per_row=self.max_pairs_per_row,
                           score_group_rows=group, accumulation_steps=self.accumulation_steps,
                           seed=self.seed, start_step=start_step,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           pad_id=self.pad_id)

    def abstract_batch(self) -> AbstractBatch:
        """The global batch at its largest: every position scorable, every tile listed."""
        rows, t, p = self.global_rows, self.row_length, self.max_pairs_per_row
        shapes = {k: ((rows, t), jnp.int32) for k in (
            "input_ids", "positions", "segment_ids", "branch_ids", "score_index", "score_target",
            "score_slot")}
        shapes.update(prompt_lengths=((rows, p), jnp.int32),
                      completion_lengths=((rows, p, 2), jnp.int32),
                      pair_mask=((rows, p), jnp.float32),
                      attention_blocks=((rows, max_block_pairs(t), 2), jnp.int32))
        return AbstractBatch(abstract_arrays(shapes, self.shardings), rows * p, rows * t)


def item_lengths(pairs, layout: str) -> np.ndarray:
    """Tokens one pair takes in a row."""
    check_layout(layout)
    p, c, r = (np.array([len(x) for x in part], np.int64)
               for part in (pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids))
    return 2 * p + c + r if layout == "packed" else p + c + r


def check_row_length(pairs, layout: str, row_length: int) -> np.ndarray:
    """item_lengths(pairs, layout), after checking that every pair fits in a row."""
    lengths = item_lengths(pairs, layout)
    if lengths.max(initial=0) > row_length:
        i = int(lengths.argmax())
        raise ValueError(f"config.pack_row_length={row_length} is shorter than training pair {i} "
                         f"({pairs.sources[i]}: {lengths[i]} tokens in batch_layout {layout!r}); "
                         f"set it >= {int(lengths.max())}, or 0 for 2 * max_length.")
    return lengths


def slot_pairs(rows, max_pairs_per_row: int) -> np.ndarray:
    """[len(rows) * max_pairs_per_row] pair index of each pair slot of `make_rows`; -1 if empty."""
    out = np.full(len(rows) * max_pairs_per_row, -1, np.int64)
    for b, row in enumerate(rows):
        out[b * max_pairs_per_row:b * max_pairs_per_row + len(row)] = row
    return out


def pack(lengths: np.ndarray, row_length: int, max_pairs_per_row: int, rng) -> list:
    """Rows (arrays of pair indices): shuffled, first-fit decreasing inside windows, rows shuffled."""
    order = rng.permutation(len(lengths))
    rows = []
    for start in range(0, len(order), WINDOW_PAIRS):
        window = order[start:start + WINDOW_PAIRS]
        window = window[np.argsort(-lengths[window], kind="stable")]
        free = np.zeros(len(window), np.int64)  # tokens left per open row; -1 once a row is full
        members: list = []
        for i in window:
            fits = np.flatnonzero(free[:len(members)] >= lengths[i])
            if len(fits):
                k = fits[0]
            else:
                k = len(members)
                members.append([])
                free[k] = row_length
            members[k].append(i)
            free[k] -= lengths[i]
            if len(members[k]) == max_pairs_per_row:
                free[k] = -1
        rows.extend(np.array(m, np.int64) for m in members)
    return [rows[i] for i in rng.permutation(len(rows))]


def epoch_plan(lengths, *, global_rows: int, row_length: int, max_pairs_per_row: int, seed: int,
               epoch: int) -> list:
    """[steps][global_rows] arrays of pair indices; the last step is topped up with empty rows."""
    rows = pack(lengths, row_length, max_pairs_per_row, np.random.default_rng([seed, epoch]))
    rows += [np.zeros(0, np.int64)] * (-len(rows) % global_rows)
    return [rows[i:i + global_rows] for i in range(0, len(rows), global_rows)]


def row_batches(pairs, *, layout: str, rows_per_process: int, seed: int, pad_id: int,
                row_length: int, max_pairs_per_row: int, start_step: int = 0,
                process_index: int = 0, process_count: int = 1, score_group_rows: int = 1,
                accumulation_steps: int = 1):
    """This process's rows of global step start_step, start_step + 1, ... forever.

    Epochs follow each other; resuming at step k replays only the (cheap) packing of earlier epochs.
    score_group_rows, accumulation_steps: see `score_groups`.
    """
    groups = score_groups(rows_per_process, score_group_rows, accumulation_steps)
    lengths = check_row_length(pairs, layout, row_length)
    global_rows = rows_per_process * process_count
    plan_args = dict(global_rows=global_rows, row_length=row_length,
                     max_pairs_per_row=max_pairs_per_row, seed=seed)
    epoch, first = 0, 0  # first: global step at which `epoch` starts
    plan = epoch_plan(lengths, epoch=epoch, **plan_args)
    step = start_step
    while True:
        while step >= first + len(plan):
            first += len(plan)
            epoch += 1
            plan = epoch_plan(lengths, epoch=epoch, **plan_args)
        rows = plan[step - first]
        counts = np.array([scored_count(pairs, r) for r in rows], np.int64)
        # Every process's groups: the processes' rows follow each other in the global batch.
        all_groups = np.concatenate([groups + p * rows_per_process for p in range(process_count)])
        width = row_score_width(counts[all_groups].sum(1), row_length, score_group_rows)
        blocks = block_width([len(block_pairs(pairs, r, layout, row_length)) for r in rows],
                             row_length)
        local = rows[process_index * rows_per_process:(process_index + 1) * rows_per_process]
        yield make_rows(pairs, local, layout=layout, pad_id=pad_id, row_length=row_length,
                        max_pairs_per_row=max_pairs_per_row, score_width=width, groups=groups,
                        attention_width=blocks)
        step += 1
