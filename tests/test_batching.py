"""Padded training order: a plain shuffle by default (as TRL), length-grouped windows with
group_by_length; either a pure function of (seed, step), split over processes."""

import jax
import numpy as np
import pytest

from simpo_jax import build
from simpo_jax import sharding as sharding_lib
from simpo_jax.data import padded
from simpo_jax.data.pairs import TokenizedPairs

GLOBAL_BATCH = 4


def pairs_of_many_lengths(n=300, seed=0):
    """Pair i's prompt starts with token i + 3, so a batch row tells which pair it holds."""
    rng = np.random.default_rng(seed)

    def ids(first, size):
        return np.concatenate([[first], rng.integers(3, 90, size - 1)]).astype(np.int32)

    return TokenizedPairs(prompt_ids=[ids(i + 3, rng.integers(1, 20)) for i in range(n)],
                          chosen_ids=[ids(5, rng.integers(1, 20)) for _ in range(n)],
                          rejected_ids=[ids(5, rng.integers(1, 20)) for _ in range(n)],
                          sources=[f"test:{i}" for i in range(n)])


def batch_pairs(batch):
    return (batch.input_ids[:, 0, 0] - 3).tolist()


def take(pairs, count, **kw):
    it = padded.pair_batches(pairs, batch_size=kw.pop("batch_size", GLOBAL_BATCH), seed=7,
                             pad_id=0, max_length=64, **kw)
    return [next(it) for _ in range(count)]


def spread(order, lengths):
    """Mean over batches of the spread (max - min) of the pairs' lengths."""
    return float(np.mean([np.ptp(lengths[rows]) for rows in order]))


def test_default_order_is_a_plain_shuffle():
    pairs = pairs_of_many_lengths()
    lengths = pairs.lengths()
    steps = pairs.num_pairs // GLOBAL_BATCH
    for epoch in (0, 1):
        expected = np.random.default_rng([7, epoch]).permutation(pairs.num_pairs)
        order = padded.epoch_order(lengths, GLOBAL_BATCH, 7, epoch)
        assert order.tolist() == expected[:steps * GLOBAL_BATCH].reshape(steps, -1).tolist()
    got = take(pairs, steps + 2)
    assert [batch_pairs(b) for b in got[:steps]] == padded.epoch_order(
        lengths, GLOBAL_BATCH, 7, 0).tolist()
    assert batch_pairs(got[steps]) == padded.epoch_order(lengths, GLOBAL_BATCH, 7, 1)[0].tolist()


def test_group_by_length_sorts_windows_of_batches():
    pairs = pairs_of_many_lengths()
    lengths = pairs.lengths()
    grouped = padded.epoch_order(lengths, GLOBAL_BATCH, 7, 0, group_by_length=True)
    plain = padded.epoch_order(lengths, GLOBAL_BATCH, 7, 0)
    assert sorted(grouped.ravel()) == sorted(plain.ravel())  # the same pairs, once each
    window = padded.WINDOW_BATCHES
    for start in range(0, len(grouped), window):
        part = sorted(grouped[start:start + window],
                      key=lambda rows: (lengths[rows].min(), lengths[rows].max()))
        for a, b in zip(part, part[1:]):  # batches are consecutive runs of the sorted window
            assert lengths[a].max() <= lengths[b].min()
    assert spread(grouped, lengths) < 0.25 * spread(plain, lengths)
    firsts = [int(lengths[rows].min()) for rows in grouped[:window]]
    assert firsts != sorted(firsts)  # the window's batches are shuffled, not short to long


@pytest.mark.parametrize("group_by_length", [False, True])
def test_order_resumes_exactly_and_splits_over_processes(group_by_length):
    pairs = pairs_of_many_lengths()
    steps = pairs.num_pairs // GLOBAL_BATCH
    full = take(pairs, steps + 3, group_by_length=group_by_length)
    for k in (1, steps - 1, steps + 1):  # across the epoch boundary
        resumed = take(pairs, 2, start_step=k, group_by_length=group_by_length)
        for a, b in zip(resumed, full[k:k + 2]):
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    halves = [take(pairs, 3, start_step=steps - 1, batch_size=GLOBAL_BATCH // 2, process_index=p,
                   process_count=2, group_by_length=group_by_length) for p in (0, 1)]
    for g, a, b in zip(full[steps - 1:], *halves):
        for key in ("input_ids", "completion_start", "lengths", "pair_mask"):
            # the same padded length on every process
            assert np.array_equal(np.concatenate([getattr(a, key), getattr(b, key)]),
                                  getattr(g, key)), key


def test_batcher_reads_group_by_length():
    pairs = pairs_of_many_lengths()
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    got = {}
    for flag in (False, True):
        batcher = padded.PaddedBatcher(mesh=mesh, global_batch=GLOBAL_BATCH, max_length=64,
                                       length_buckets=(), seed=7, group_by_length=flag,
                                       pairs=pairs, pad_id=0)
        with batcher.batches(start_step=3) as it:
            got[flag] = [batch_pairs(jax.tree.map(np.asarray, next(it))) for _ in range(2)]
        want = take(pairs, 2, start_step=3, group_by_length=flag)
        assert got[flag] == [batch_pairs(b) for b in want]
    assert got[False] != got[True]



@pytest.mark.slow
def test_resumed_loop_reads_the_batches_of_the_checkpoint_step(tmp_path, monkeypatch):
    """The train loop resuming at step k asks for the batches from step k on (the tests above:
    those are the batches an uninterrupted run reads there). No step compiles: k = max_steps."""
    from test_resume import tiny_config
    from simpo_jax import train

    config = tiny_config(tmp_path, max_steps=2, dataset_splits=("train_prefs",), num_samples=0,
                         report_to=())
    run = build.build(config)
    run.checkpointer.save(2, run.state, run.meta)
    run.checkpointer.close()
    seen = []
    batcher_type = type(run.batcher)  # the default layout's (shared_prompt)
    batches = batcher_type.batches

    def recording(batcher, start_step=0):
        seen.append(start_step)
        return batches(batcher, start_step)

    monkeypatch.setattr(batcher_type, "batches", recording)
    train.train(config)
    assert seen == [2]


def trl_width(pairs, rows) -> int:
    """The length TRL's CPO trainer pads a batch to: its collator pads chosen and rejected to their
    longest, and concatenated_inputs both to the longer of the two."""
    import torch  # noqa: F401  (the collator returns torch tensors)
    from trl.experimental.utils import DPODataCollatorWithPadding

    features = []
    for i in rows:
        p = list(map(int, pairs.prompt_ids[i]))
        features.append({f"{side}_input_ids": p + list(map(int, ids)) for side, ids in
                         (("chosen", pairs.chosen_ids[i]), ("rejected", pairs.rejected_ids[i]))})
    batch = DPODataCollatorWithPadding(pad_token_id=0)(features)
    return max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])


@pytest.mark.parametrize("max_length", [512, 4096])
def test_padded_batches_pad_about_as_little_as_trl(max_length):
    """Each batch is at least as long as TRL's (every pair fits) and at most one rounding step
    longer; the lengths a run can compile stay few."""
    rng = np.random.default_rng(1)
    parts = [[rng.integers(3, 90, rng.integers(50, 151)).astype(np.int32) for _ in range(64)]
             for _ in range(3)]
    pairs = TokenizedPairs(*parts, sources=[f"test:{i}" for i in range(64)])
    step = padded.width_step(max_length)
    assert step % padded.WIDTH_MULTIPLE == 0  # the smallest such multiple giving MAX_WIDTHS
    assert step - padded.WIDTH_MULTIPLE < max_length / padded.MAX_WIDTHS <= step
    order = padded.epoch_order(pairs.lengths(), 8, seed=0, epoch=0)
    batches = padded.pair_batches(pairs, batch_size=8, seed=0, pad_id=0, max_length=max_length)
    for rows in order:
        width, trl = next(batches).input_ids.shape[2], trl_width(pairs, rows)
        assert trl <= width < trl + step, (width, trl)
    for m in (64, 100, 512, 1000, 1024, 4096, 8192, 32768):
        widths = padded.bucket_lengths(m)
        assert len(widths) <= padded.MAX_WIDTHS and widths[-1] == m, (m, widths)
    assert padded.bucket_lengths(512, (300, 512)) == (300, 512)  # length_buckets still rule


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_start_up_line_names_the_layout_and_its_fill(layout):
    """The fill the start-up line prints is that of the batches the first epoch trains on."""
    from simpo_jax.data import packed, packed_rows

    pairs = pairs_of_many_lengths()
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    if layout == "padded":
        batcher = padded.PaddedBatcher(mesh=mesh, global_batch=8, max_length=64, length_buckets=(),
                                       seed=7, group_by_length=False, pairs=pairs, pad_id=0)
        batches = batcher.local_batches()
        real = slots = 0
        for _ in range(batcher.steps_per_epoch):
            b = next(batches)
            real, slots = real + b.lengths.sum(), slots + b.input_ids.size
        want = real / slots
    else:
        batcher = packed.PackedBatcher(mesh=mesh, layout=layout, row_length=128,
                                       rows_per_device=2, max_pairs_per_row=8,
                                       accumulation_steps=1, seed=7, pairs=pairs, pad_id=0)
        batches = batcher.local_batches()
        want = np.mean([packed_rows.packing_efficiency(next(batches))
                        for _ in range(batcher.steps_per_epoch)])
    assert batcher.fill() == pytest.approx(want, rel=1e-9)
    assert batcher.description.startswith(f"{layout} batches: ")
    assert f"fill {want:.0%}" in batcher.description
