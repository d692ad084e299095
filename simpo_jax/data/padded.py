"""Padded pair batches with static shapes (batch_layout "padded"); the training order is a pure
function of (seed, step).

Each epoch is a random permutation cut into global batches, as TRL's and the original SimPO
trainer's random samplers; group_by_length instead sorts windows of WINDOW_BATCHES global batches
by length (less padding, but a step is then all-short or all-long pairs). The remainder
(num_pairs % global batch) is dropped each epoch. A batch is as long as its longest pair rounded
up to a multiple of 32 tokens (TRL pads to the longest pair exactly; the rounding bounds the
compiled shapes to MAX_WIDTHS), or to config.length_buckets when given. Batch format:
batch.PaddedBatch. The default layout is shared_prompt (packed.py): padded is for debugging and
comparison, and the eval batches of every layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from simpo_jax import sharding as sharding_lib
from simpo_jax.data import feed
from simpo_jax.data.batch import AbstractBatch, PaddedBatch, abstract_arrays, batch_shardings

WINDOW_BATCHES = 64  # group_by_length: length-sorted windows of this many global batches
# A batch is padded to its longest pair rounded up to a multiple of WIDTH_MULTIPLE tokens (more
# where max_length would give more than MAX_WIDTHS lengths): each length compiles its own step.
WIDTH_MULTIPLE = 32
MAX_WIDTHS = 16


@dataclasses.dataclass(frozen=True)
class PaddedBatcher:
    """The Batcher of batch_layout "padded": global batches of `global_batch` pairs."""

    mesh: Any
    global_batch: int  # pairs per optimizer step, over every process and micro-batch
    max_length: int
    length_buckets: tuple  # config.length_buckets; () = the longest pair, rounded (bucket_lengths)
    seed: int
    group_by_length: bool
    pairs: Any  # TokenizedPairs; None: abstract batches only (the planner)
    pad_id: int | None  # None with pairs None
    layout: ClassVar[str] = "padded"
    meta: ClassVar[None] = None  # the checkpoint's "packing": none for padded batches

    @classmethod
    def from_config(cls, config, mesh, data=None) -> "PaddedBatcher":
        dp = sharding_lib.data_parallel_size(mesh)
        return cls(mesh=mesh, global_batch=config.per_device_train_batch_size * dp
                   * config.gradient_accumulation_steps, max_length=config.max_length,
                   length_buckets=tuple(config.length_buckets), seed=config.seed,
                   group_by_length=config.group_by_length,
                   pairs=None if data is None else data.train,
                   pad_id=None if data is None else data.pad_id)

    @property
    def steps_per_epoch(self) -> int:
        return self.pairs.num_pairs // self.global_batch

    @property
    def description(self) -> str:
        """The start-up line: the layout, its lengths and fill over the first epoch."""
        widths = bucket_lengths(self.max_length, self.length_buckets)
        rule = (f"to config.length_buckets {widths}" if self.length_buckets else
                f"to their batch's longest pair rounded up to {width_step(self.max_length)} tokens")
        return (f"padded batches: a pair per row, padded {rule}; fill {self.fill():.0%} "
                f"(real tokens / computed ones, first epoch)")

    def fill(self, epoch: int = 0) -> float:
        """Real tokens / computed tokens of the epoch's batches (before the split over processes)."""
        order = epoch_order(self.pairs.lengths(), self.global_batch, self.seed, epoch,
                            self.group_by_length)
        widths = bucket_lengths(self.max_length, self.length_buckets)
        longest = self.pairs.lengths()
        real = np.array([2 * len(p) + len(c) + len(r) for p, c, r in zip(
            self.pairs.prompt_ids, self.pairs.chosen_ids, self.pairs.rejected_ids)], np.int64)
        computed = sum(2 * len(rows) * _bucket(int(longest[rows].max()), widths) for rows in order)
        return float(real[order].sum() / max(computed, 1))

    @property
    def shardings(self) -> PaddedBatch:
        return batch_shardings(self.mesh, self.layout)

    def batches(self, start_step: int = 0) -> feed.prefetch:
        """This process's device batches from global step start_step on, prefetched."""
        return feed.prefetch(self.local_batches(start_step), self.shardings)

    def local_batches(self, start_step: int = 0):
        """This process's numpy batches from global step start_step on."""
        return pair_batches(self.pairs, batch_size=self.global_batch // jax.process_count(),
                            seed=self.seed, start_step=start_step,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), pad_id=self.pad_id,
                            max_length=self.max_length, length_buckets=self.length_buckets,
                            group_by_length=self.group_by_length)

    def abstract_batch(self) -> AbstractBatch:
        """The global batch at its longest (max_length), with its shardings."""
        pairs, t = self.global_batch, self.max_length
        shapes = {"input_ids": ((pairs, 2, t), jnp.int32),
                  "completion_start": ((pairs, 2), jnp.int32),
                  "lengths": ((pairs, 2), jnp.int32), "pair_mask": ((pairs,), jnp.float32)}
        return AbstractBatch(abstract_arrays(shapes, self.shardings), pairs, pairs * 2 * t)


def bucket_lengths(max_length: int, length_buckets=()) -> tuple:
    """The padded lengths a batch takes, ascending: config.length_buckets, or when empty multiples
    of `width_step(max_length)` below max_length, plus max_length (at most MAX_WIDTHS of them)."""
    if length_buckets:
        return tuple(sorted(length_buckets))
    step = width_step(max_length)
    return tuple(range(step, max_length, step)) + (max_length,)


def width_step(max_length: int) -> int:
    """The rounding of a batch's longest pair: a multiple of WIDTH_MULTIPLE, so that no more than
    MAX_WIDTHS lengths (compiled steps) exist up to max_length."""
    per_width = -(-max_length // MAX_WIDTHS)
    return WIDTH_MULTIPLE * -(-per_width // WIDTH_MULTIPLE)


def epoch_order(lengths: np.ndarray, global_batch: int, seed: int, epoch: int,
                group_by_length: bool = False) -> np.ndarray:
    """[steps_per_epoch, global_batch] pair indices: shuffled (then length-sorted inside windows
    of batches, which are shuffled, if group_by_length)."""
    steps = len(lengths) // global_batch
    rng = np.random.default_rng([seed, epoch])
    rows = rng.permutation(len(lengths))[:steps * global_batch]
    if not group_by_length:
        return rows.reshape(steps, global_batch)
    batches = []
    window = WINDOW_BATCHES * global_batch
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")].reshape(-1, global_batch)
        batches.append(chunk[rng.permutation(len(chunk))])
    return np.concatenate(batches) if batches else np.zeros((0, global_batch), np.int64)


def pair_batches(pairs, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1, pad_id: int, max_length: int, length_buckets=(),
                 group_by_length: bool = False):
    """This process's `batch_size` rows of global batch (batch_size * process_count) for steps
    start_step, start_step + 1, ... forever; epoch e = step // steps per epoch."""
    global_batch = batch_size * process_count
    steps = pairs.num_pairs // global_batch
    if steps < 1:
        raise ValueError(f"{pairs.num_pairs} pairs are fewer than one global batch of {global_batch}.")
    buckets = bucket_lengths(max_length, length_buckets)
    lengths = pairs.lengths()
    step, epoch, order = start_step, None, None
    while True:
        if step // steps != epoch:
            epoch = step // steps
            order = epoch_order(lengths, global_batch, seed, epoch, group_by_length)
        rows = order[step % steps]
        width = _bucket(int(lengths[rows].max()), buckets)  # same T on every process
        local = rows[process_index * batch_size:(process_index + 1) * batch_size]
        yield make_batch(pairs, local, np.ones(len(local), np.float32), pad_id, width)
        step += 1


def eval_batches(pairs, *, batch_size: int, pad_id: int, max_length: int, process_index: int = 0,
                 process_count: int = 1, length_buckets=()):
    """The whole split in order; the last global batch is filled with copies of pair 0, masked out."""
    global_batch = batch_size * process_count
    buckets = bucket_lengths(max_length, length_buckets)
    lengths = pairs.lengths()
    for start in range(0, pairs.num_pairs, global_batch):
        rows = np.arange(start, start + global_batch)
        mask = (rows < pairs.num_pairs).astype(np.float32)
        rows = np.where(mask > 0, rows, 0)  # dummies copy a real pair: finite losses, masked out
        width = _bucket(int(lengths[rows].max()), buckets)
        part = slice(process_index * batch_size, (process_index + 1) * batch_size)
        yield make_batch(pairs, rows[part], mask[part], pad_id, width)


def make_batch(pairs, rows, pair_mask, pad_id: int, width: int) -> PaddedBatch:
    input_ids = np.full((len(rows), 2, width), pad_id, np.int32)
    start = np.zeros((len(rows), 2), np.int32)
    lengths = np.zeros((len(rows), 2), np.int32)
    for b, i in enumerate(rows):
        prompt = pairs.prompt_ids[i]
        for k, completion in enumerate((pairs.chosen_ids[i], pairs.rejected_ids[i])):
            n = len(prompt) + len(completion)
            input_ids[b, k, :len(prompt)] = prompt
            input_ids[b, k, len(prompt):n] = completion
            start[b, k], lengths[b, k] = len(prompt), n
    return PaddedBatch(input_ids=input_ids, completion_start=start, lengths=lengths,
                       pair_mask=np.asarray(pair_mask, np.float32))


def padding_efficiency(batch: PaddedBatch) -> float:
    """Tokens of real pairs / (B * 2 * T)."""
    real = float((batch.lengths * batch.pair_mask[:, None]).sum())
    return real / batch.input_ids.size


def _bucket(longest: int, buckets: tuple) -> int:
    for t in buckets:
        if t >= longest:
            return t
    raise ValueError(f"A pair of {longest} tokens is longer than the largest length bucket "
                     f"{buckets[-1]}; raise length_buckets or max_length.")
