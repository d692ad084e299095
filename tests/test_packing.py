"""Packed and shared-prompt rows equal the padded layout (logps, loss, gradients); packing order."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import optim
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib
from simpo_jax.data import PACKED_LAYOUTS, packed as packing, packed_rows
from simpo_jax.data.batch import batch_shardings
from simpo_jax.data.padded import make_batch
from simpo_jax.data.pairs import TokenizedPairs

LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)
GEMMA2 = dict(model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0, max_position_embeddings=128)
# Gemma 3: a RoPE table per layer type (local base on sliding layers) next to the window
GEMMA3 = dict(model_type="gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=24, sliding_window=4, max_position_embeddings=128,
              layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": dict(rope_theta=10.0),
                               "full_attention": dict(rope_type="linear", rope_theta=100.0,
                                                      factor=8.0)})
# Phi-3: partial rotary and longrope past original_max_position_embeddings (long factors, chosen
# from the largest position: the same in packed rows, whose positions restart per sequence)
PHI3 = dict(model_type="phi3", vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, original_max_position_embeddings=4, pad_token_id=0,
            eos_token_id=2, bos_token_id=1,
            rope_parameters=dict(rope_type="longrope", rope_theta=100.0, partial_rotary_factor=0.75,
                                 short_factor=[1.0, 1.5, 2.0], long_factor=[2.0, 4.0, 8.0]))
LOSS = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1)
ROW, MAX_PAIRS = 64, 8


def random_pairs(n, seed=0, prompt=(1, 12), completion=(1, 12)):
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(3, LLAMA["vocab_size"], rng.integers(lo, hi + 1)).astype(np.int32)

    return TokenizedPairs(prompt_ids=[ids(*prompt) for _ in range(n)],
                          chosen_ids=[ids(*completion) for _ in range(n)],
                          rejected_ids=[ids(*completion) for _ in range(n)],
                          sources=[f"test:{i}" for i in range(n)])


def edge_pairs(n=12):
    """Random pairs plus the edges: an empty prompt; an empty rejected completion, and an empty
    prompt before a one-token chosen (nothing scored: neither pair counts)."""
    pairs = random_pairs(n)
    pairs.prompt_ids[3] = pairs.prompt_ids[3][:0]
    pairs.rejected_ids[5] = pairs.rejected_ids[5][:0]
    pairs.prompt_ids[7], pairs.chosen_ids[7] = pairs.prompt_ids[7][:0], pairs.chosen_ids[7][:1]
    return pairs


def both_batches(pairs, layout, rows_multiple=1, group_rows=1, accumulation=1):
    """The padded batch of all pairs, the row batch of all pairs, and each slot's pair index."""
    padded = make_batch(pairs, np.arange(pairs.num_pairs), np.ones(pairs.num_pairs), 0,
                        int(pairs.lengths().max()))
    rows = packing.pack(packing.item_lengths(pairs, layout), ROW, MAX_PAIRS,
                        np.random.default_rng(0))
    rows += [np.zeros(0, np.int64)] * (-len(rows) % (rows_multiple * group_rows * accumulation))
    packed = packed_rows.make_rows(pairs, rows, layout=layout, pad_id=0, row_length=ROW,
                                   max_pairs_per_row=MAX_PAIRS, groups=packed_rows.score_groups(
                                       len(rows), group_rows, accumulation))
    return padded, packed, packing.slot_pairs(rows, MAX_PAIRS)


def counted(pairs):
    """(pairs the loss counts, their chosen scored tokens), from the token lists: a completion's
    tokens from sequence index 1 on are scored; a pair counts if both sides have one."""
    scored = [[len(c) - (len(p) == 0 and len(c) > 0) for c in (ch, rj)]
              for p, ch, rj in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)]
    valid = [c > 0 and r > 0 for c, r in scored]
    return sum(valid), sum(c for (c, _), v in zip(scored, valid) if v)


def objective(graphdef, chunk, num_pairs, num_sft):
    def fn(params, batch):
        sums, nll, _ = step_lib.pair_forward(graphdef, params, batch, LOSS, chunk)
        return sums["simpo_loss"] / num_pairs + LOSS.sft_weight * nll / num_sft, sums
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


@pytest.mark.parametrize("config,layout", [
    pytest.param(LLAMA, "packed", id="llama-packed", marks=pytest.mark.slow),
    pytest.param(GEMMA2, "shared_prompt", id="gemma2_window4-shared_prompt",
                 marks=pytest.mark.slow),
    pytest.param(LLAMA, "shared_prompt", id="llama-shared_prompt", marks=pytest.mark.slow),
    pytest.param(GEMMA2, "packed", id="gemma2_window4-packed", marks=pytest.mark.slow),
    pytest.param(GEMMA3, "shared_prompt", id="gemma3_window4-shared_prompt",
                 marks=pytest.mark.slow),
    pytest.param(GEMMA3, "packed", id="gemma3_window4-packed", marks=pytest.mark.slow),
    pytest.param(PHI3, "shared_prompt", id="phi3_longrope-shared_prompt", marks=pytest.mark.slow),
    pytest.param(PHI3, "packed", id="phi3_longrope-packed", marks=pytest.mark.slow),
])
def test_rows_equal_padded(config, layout):
    pairs = edge_pairs()
    graphdef, params = nnx.split(models.from_config(config, seed=1), nnx.Param)
    padded, packed, slot_pair = both_batches(pairs, layout)
    assert packed_rows.pair_tokens(packed) == int(padded.lengths.sum())
    stats = jax.jit(step_lib.pair_stats, static_argnums=(0, 3))
    ref = [np.asarray(x) for x in stats(graphdef, params, padded, 0)]
    got = [np.asarray(x) for x in stats(graphdef, params, packed, 5)]  # chunked head on rows
    real = slot_pair >= 0
    assert sorted(slot_pair[real]) == list(range(pairs.num_pairs))
    for r, g in zip(ref[:4], got[:4]):  # avg logps, counts, mean logits, summed logps
        np.testing.assert_allclose(g[real], r[slot_pair[real]], rtol=1e-5, atol=1e-5)
    assert not got[4][~real].any()

    # The step's denominators (known before the forward pass) are the pairs and tokens scored.
    num_pairs, num_sft = counted(pairs)
    assert num_pairs == pairs.num_pairs - 2
    for batch in (padded, packed):
        assert [float(x) for x in step_lib.denominators(batch)] == [num_pairs, num_sft]
    (loss_ref, sums_ref), g_ref = objective(graphdef, 0, num_pairs, num_sft)(params, padded)
    (loss_rows, sums_rows), g_rows = objective(graphdef, 16, num_pairs, num_sft)(params, packed)
    np.testing.assert_allclose(float(loss_rows), float(loss_ref), rtol=1e-5, atol=1e-6)
    assert float(sums_rows["pairs"]) == float(sums_ref["pairs"]) == num_pairs
    assert float(sums_rows["sft_tokens"]) == float(sums_ref["sft_tokens"]) == num_sft
    for k in sums_ref:
        np.testing.assert_allclose(float(sums_rows[k]), float(sums_ref[k]), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g_rows, g_ref)


@pytest.mark.parametrize("layout,group_rows,accumulation", [
    ("packed", 1, 1), ("shared_prompt", 1, 1), ("packed", 2, 2), ("shared_prompt", 3, 1)])
def test_rows_hold_each_sequence_at_its_positions(layout, group_rows, accumulation):
    """Each pair's two sequences, read back from the row by segment and branch, are prompt +
    completion at positions 0..n-1; each scored slot is a completion token (index >= 1 in its
    sequence) predicted from the hidden state of the token before it in that sequence; a score
    group's slots name the row (k * T + index) and its pair slot (k * P + slot)."""
    pairs = edge_pairs()
    _, rows, slot_pair = both_batches(pairs, layout, group_rows=group_rows,
                                      accumulation=accumulation)
    groups = packed_rows.score_groups(len(rows.input_ids), group_rows, accumulation)
    assert rows.score_index.shape[0] == len(groups)
    group_of = {int(row): (j, k) for j, members in enumerate(groups)
                for k, row in enumerate(members)}
    for s, i in enumerate(slot_pair):
        if i < 0:
            continue
        r, slot = divmod(s, MAX_PAIRS)
        j, k = group_of[r]
        prompt = list(pairs.prompt_ids[i])
        for side, completion in enumerate((pairs.chosen_ids[i], pairs.rejected_ids[i])):
            if layout == "packed":
                seen = rows.segment_ids[r] == 2 * slot + side + 1
            else:
                seen = (rows.segment_ids[r] == slot + 1) & np.isin(rows.branch_ids[r],
                                                                      (0, side + 1))
            at = np.flatnonzero(seen)
            sequence = prompt + list(completion)
            assert rows.input_ids[r, at].tolist() == sequence
            assert rows.positions[r, at].tolist() == list(range(len(sequence)))
            mine = rows.score_slot[j] == 2 * (k * MAX_PAIRS + slot) + side
            first = max(len(prompt), 1)
            assert rows.score_target[j, mine].tolist() == sequence[first:]
            assert rows.score_index[j, mine].tolist() == (k * ROW + at[first - 1:-1]).tolist()


def test_score_groups_follow_the_steps_micro_batches_and_devices():
    """Group j holds the rows one device computes in micro-batch j % accumulation (the step takes
    row r into micro-batch r % accumulation, then shards rows in contiguous blocks)."""
    groups = packed_rows.score_groups(12, group_rows=2, accumulation_steps=3)
    assert groups.tolist() == [[0, 3], [1, 4], [2, 5], [6, 9], [7, 10], [8, 11]]
    assert packed_rows.score_groups(4, 1).tolist() == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="multiple"):
        packed_rows.score_groups(8, group_rows=3)


def test_score_groups_cut_the_heads_padding():
    """Pooling a group's scored tokens: the head computes the group's total rounded up, not
    g x its fullest row's."""
    pairs = random_pairs(200, seed=5, **BENCH_LIKE)
    rows = packing.pack(packing.item_lengths(pairs, "shared_prompt"), 768, 16,
                        np.random.default_rng(0))[:8]
    scored = sum(packed_rows.scored_count(pairs, r) for r in rows)
    one = packed_rows.make_rows(pairs, rows, layout="shared_prompt", pad_id=0, row_length=768,
                                max_pairs_per_row=16)
    pooled = packed_rows.make_rows(pairs, rows, layout="shared_prompt", pad_id=0, row_length=768,
                                   max_pairs_per_row=16, groups=packed_rows.score_groups(8, 8))
    assert pooled.score_index.size <= scored + 8 * 768 // 64
    assert pooled.score_index.size < one.score_index.size
    assert (pooled.score_slot >= 0).sum() == (one.score_slot >= 0).sum() == scored


@pytest.mark.slow
def test_sharded_train_step_equals_padded():
    """The jitted step on a 2x2x2 mesh, accumulating 2 micro-batches of rows, each device's two
    rows a score group: padded's metrics."""
    pairs = random_pairs(16, seed=4)
    padded, packed, _ = both_batches(pairs, "shared_prompt", rows_multiple=4, group_rows=2,
                                     accumulation=2)
    assert packed.input_ids.shape[0] == 2 * packed.score_index.shape[0] == 16
    tx, schedule = optim.make_optimizer(optim.OptimConfig(
        learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_ratio=0.0, warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1e9, master_weights="float32", optimizer_state_dtype="float32",
        seed=0), total_steps=10)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(2, 2, 2))
    out = {}
    for layout, batch, accumulation in (("padded", padded, 1), ("shared_prompt", packed, 2)):
        graphdef, params = nnx.split(models.from_config(LLAMA, seed=3), nnx.Param)
        abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
        fn, state_sh = step_lib.jit_train_step(
            mesh, abstract, batch_layout=layout, graphdef=graphdef, tx=tx, schedule=schedule,
            cfg=LOSS, accumulation_steps=accumulation, logits_chunk_size=8)
        state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
        _, metrics = fn(state, jax.device_put(batch, batch_shardings(mesh, layout)))
        out[layout] = {k: float(v) for k, v in metrics.items()}
    # Real tokens computed: the shared prompt once per pair instead of twice.
    prompts = sum(len(p) for p in pairs.prompt_ids)
    assert out["padded"].pop("num_tokens") == out["shared_prompt"].pop("num_tokens") + prompts
    assert out["padded"]["num_pairs"] == pairs.num_pairs
    for k, v in out["padded"].items():
        assert out["shared_prompt"][k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_head_sees_only_scored_tokens_as_2d():
    """The compiled head matmul is [R*N, D] x [D, V] with N < T (no full-sequence logits)."""
    pairs = random_pairs(12, seed=2)
    _, packed, _ = both_batches(pairs, "packed")
    graphdef, params = nnx.split(models.from_config(LLAMA, seed=1), nnx.Param)
    r, n = packed.score_index.shape
    assert n < ROW
    text = jax.jit(step_lib.pair_stats, static_argnums=(0, 3)).lower(
        graphdef, params, packed, 0).as_text()
    assert f"tensor<{r * n}x{LLAMA['vocab_size']}xf32>" in text
    assert f"tensor<{r}x{ROW}x{LLAMA['vocab_size']}xf32>" not in text
    assert f"tensor<{r}x{n}x{LLAMA['vocab_size']}xf32>" not in text


BENCH_LIKE = dict(prompt=(50, 150), completion=(50, 150))  # bench/simpo_vs_trl.py's lengths


@pytest.mark.parametrize("layout,row_length", [("packed", 2048), ("shared_prompt", 1024)])
def test_packing_efficiency_on_bench_lengths(layout, row_length):
    pairs = random_pairs(2000, seed=1, **BENCH_LIKE)
    lengths = packing.item_lengths(pairs, layout)
    plan = packing.epoch_plan(lengths, global_rows=8, row_length=row_length, max_pairs_per_row=16,
                              seed=0, epoch=0)
    full = [rows for rows in plan[:-1]]  # the epoch's last step is topped up with empty rows
    efficiency = sum(lengths[r].sum() for rows in full for r in rows) / (
        len(full) * 8 * row_length)
    assert efficiency >= 0.95, efficiency
    batch = next(packing.row_batches(pairs, layout=layout, rows_per_process=8, seed=0, pad_id=0,
                                     row_length=row_length, max_pairs_per_row=16))
    assert packed_rows.packing_efficiency(batch) >= 0.9


def _batches(pairs, start, count, **kw):
    it = packing.row_batches(pairs, layout="packed", rows_per_process=kw.pop("rows", 4), seed=7,
                             pad_id=0, row_length=ROW, max_pairs_per_row=MAX_PAIRS,
                             start_step=start, **kw)
    return [next(it) for _ in range(count)]


def steps_per_epoch(pairs):
    """The packed batcher's steps per epoch of 4 rows per step (one device, seed 7)."""
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    return packing.PackedBatcher(mesh=mesh, layout="packed", row_length=ROW, rows_per_device=4,
                                 max_pairs_per_row=MAX_PAIRS, accumulation_steps=1, seed=7,
                                 pairs=pairs, pad_id=0).steps_per_epoch


def same(a, b):
    return type(a) is type(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_order_is_deterministic_and_resumes_exactly():
    pairs = random_pairs(40, seed=3)
    steps = steps_per_epoch(pairs)
    full = _batches(pairs, 0, 2 * steps + 2)  # across two epoch boundaries
    again = _batches(pairs, 0, 3)
    resumed = _batches(pairs, steps - 1, steps + 3)
    for a, b in zip(full[:3], again):
        assert same(a, b)
    for a, b in zip(full[steps - 1:], resumed):
        assert same(a, b)
    assert not np.array_equal(full[0].input_ids, full[steps].input_ids)  # epochs differ
    # Two processes' rows (and score groups) are the halves of the one-process global batch.
    for group, accum in ((1, 1), (2, 1), (1, 2)):
        kw = dict(score_group_rows=group, accumulation_steps=accum)
        whole = _batches(pairs, 1, 1, **kw)[0]
        halves = [_batches(pairs, 1, 1, rows=2, process_index=i, process_count=2, **kw)[0]
                  for i in (0, 1)]
        assert whole.score_index.shape[0] == 4 // group
        for k in (f.name for f in dataclasses.fields(whole)):
            parts = [getattr(h, k) for h in halves]
            # N and M are the global step's, on every process
            assert parts[0].shape[1:] == parts[1].shape[1:] == getattr(whole, k).shape[1:], k
            assert np.array_equal(np.concatenate(parts), getattr(whole, k)), k


def test_every_pair_once_per_epoch():
    pairs = random_pairs(53, seed=5)
    for layout in PACKED_LAYOUTS:
        lengths = packing.item_lengths(pairs, layout)
        for epoch in (0, 1):
            plan = packing.epoch_plan(lengths, global_rows=4, row_length=ROW,
                                      max_pairs_per_row=MAX_PAIRS, seed=7, epoch=epoch)
            assert all(len(step) == 4 for step in plan)
            seen = np.concatenate([r for step in plan for r in step])
            assert sorted(seen) == list(range(pairs.num_pairs))
            assert all(lengths[r].sum() <= ROW and len(r) <= MAX_PAIRS
                       for step in plan for r in step)
    # The batches carry every pair's tokens: the count of real pairs over one epoch's steps.
    steps = steps_per_epoch(pairs)
    assert sum(b.pair_mask.sum() for b in _batches(pairs, 0, steps)) == pairs.num_pairs


def test_row_too_short_names_the_field():
    with pytest.raises(ValueError, match="pack_row_length=16"):
        next(packing.row_batches(random_pairs(4), layout="packed", rows_per_process=1, seed=0,
                                 pad_id=0, row_length=16, max_pairs_per_row=4))


@pytest.mark.slow
def test_packed_run_resumes_exactly(tmp_path):
    """A tiny run with batch_layout=shared_prompt, stopped after step 10 and resumed: same steps."""
    import shutil

    from test_resume import final_params, tiny_config, train_rows
    from simpo_jax import train

    layout = dict(batch_layout="shared_prompt", pack_rows_per_device=1, pack_row_length=96)
    full = tmp_path / "full"
    train.train(tiny_config(full, **layout))
    rows = train_rows(full)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r["pairs_per_second"] > 0 and 0 < r["mfu"] for r in rows)
    out = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "20")
    train.train(tiny_config(out, **layout))
    for r_ref, r in zip(rows[2:], train_rows(out)):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert r[k] == pytest.approx(r_ref[k], abs=1e-6), (r["step"], k)
    a, _ = final_params(full, **layout)
    b, _ = final_params(out, **layout)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
    # Resuming with another layout is refused, naming the setting.
    with pytest.raises(ValueError, match="packing"):
        train.train(tiny_config(out, batch_layout="packed", pack_rows_per_device=1))


def test_too_short_rows_fail_before_training(tmp_path):
    from test_resume import tiny_config
    from simpo_jax import build

    with pytest.raises(ValueError, match=r"config.pack_row_length=16 .*set it >= \d+"):
        build.build(tiny_config(tmp_path, batch_layout="packed", pack_row_length=16))
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
