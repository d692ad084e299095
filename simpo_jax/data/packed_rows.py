"""The row batch (batch.PackedBatch) of rows of packed pairs: tokens, segments, scored slots, tiles.

Row batch (numpy), R rows of this process, T = row_length, P = max_pairs_per_row, N scored slots:
  input_ids, positions, segment_ids (0 = padding), branch_ids  int32 [R, T];
  score_index int32 [R/g, g*N]: the hidden state predicting a scored completion token, as
  k * T + index in row k of the group, score_target int32 [R/g, g*N]: that token, score_slot int32
  [R/g, g*N]: 2 * (k * P + pair slot) + side (0 chosen, 1 rejected), -1 for unused slots;
  prompt_lengths int32 [R, P], completion_lengths int32 [R, P, 2], pair_mask float32 [R, P];
  attention_blocks int32 [R, M, 2]: the (query block, key block) pairs of SPARSE_BLOCK tokens in
  which a query sees a key (own segment, shared prompt), -1 pads; attention computes only these.
  M is the step's largest per-row count, rounded up to half the blocks of a row.
Score groups: the LM head runs on the scored completion tokens only, and a group of g rows (those
one device computes in one micro-batch, see `score_groups`) pools its rows' scored tokens, so the
head's padding is that of the group's total, not of its fullest row. N is the step's largest
group total / g, rounded up to T / (8 g): only a few shapes compile. g = 1: one row per group.
Scored tokens are those of the padded layout: completion tokens with index >= 1 in their sequence.
"""

from __future__ import annotations

import numpy as np

from simpo_jax.attention_tiles import SPARSE_BLOCK
from simpo_jax.data import PACKED_LAYOUTS
from simpo_jax.data.batch import PackedBatch

SCORE_BUCKETS = 8  # N is a multiple of row_length / SCORE_BUCKETS
SCORE_KEYS = ("score_index", "score_target", "score_slot")


def score_groups(num_rows: int, group_rows: int, accumulation_steps: int = 1) -> np.ndarray:
    """[num_rows / g, g] the rows of each score group, in the order the train step sees them.

    The train step splits a batch's rows into micro-batches by stride (row r goes to micro-batch
    r % accumulation_steps) and shards each micro-batch's rows in contiguous blocks over devices;
    group j holds the g rows that one device computes in micro-batch j % accumulation_steps, which
    are consecutive there, so the step's gather stays on the device. A process's rows are whole
    groups when num_rows is a multiple of g * accumulation_steps (checked).
    """
    g, a = group_rows, accumulation_steps
    if g < 1 or num_rows % (g * a):
        raise ValueError(f"{num_rows} rows do not split into score groups of {g} rows over {a} "
                         "accumulation steps: the rows must be a multiple of their product.")
    j = np.arange(num_rows // g)[:, None]
    return j % a + a * ((j // a) * g + np.arange(g)[None, :])


def scored_count(pairs, row) -> int:
    """Scored completion tokens of one row (the same in both layouts)."""
    return int(sum(_scored(len(pairs.prompt_ids[i]), len(c))
                   for i in row for c in (pairs.chosen_ids[i], pairs.rejected_ids[i])))


def row_score_width(counts, row_length: int, group_rows: int = 1) -> int:
    """N for score groups of `group_rows` rows with these scored-token totals: the largest total
    per row, rounded up to row_length / (8 * group_rows)."""
    per_row = -(-max(counts, default=1) // group_rows)
    return _round_up(per_row, max(row_length // (SCORE_BUCKETS * group_rows), 1), row_length)


def visible_ranges(pairs, row, layout: str) -> list:
    """(query start, query end, key start, key end) of a row: a query in [qs, qe) sees the keys in
    [ks, ke) up to its own index, and no others (the mask of layers.base_mask)."""
    at, out = 0, []
    for i in row:
        lp = len(pairs.prompt_ids[i])
        lc, lr = len(pairs.chosen_ids[i]), len(pairs.rejected_ids[i])
        if layout == "packed":  # [prompt+chosen][prompt+rejected]: two segments
            for n in (lp + lc, lp + lr):
                out.append((at, at + n, at, at + n))
                at += n
        else:  # [prompt | chosen | rejected]: each completion sees the prompt and itself
            prompt, chosen = (at, at + lp), (at + lp, at + lp + lc)
            rejected = (chosen[1], chosen[1] + lr)
            out += [prompt + prompt, chosen + prompt, chosen + chosen, rejected + prompt,
                    rejected + rejected]
            at = rejected[1]
    return [r for r in out if r[0] < r[1] and r[2] < r[3]]


def block_pairs(pairs, row, layout: str, row_length: int) -> np.ndarray:
    """[m, 2] sorted (query block, key block) pairs of SPARSE_BLOCK tokens with a visible key."""
    nb = -(-row_length // SPARSE_BLOCK)
    start = np.arange(nb) * SPARSE_BLOCK
    seen = np.zeros((nb, nb), bool)
    for qs, qe, ks, ke in visible_ranges(pairs, row, layout):
        # Block i's queries in the range end at q_last; block j's keys in it start at k_first: a
        # key at or before a query exists iff k_first <= q_last.
        q_last = np.minimum(qe, start + SPARSE_BLOCK) - 1
        k_first = np.maximum(ks, start)
        q_in = (start < qe) & (start + SPARSE_BLOCK > qs)
        k_in = (start < ke) & (start + SPARSE_BLOCK > ks)
        seen |= q_in[:, None] & k_in[None, :] & (k_first[None, :] <= q_last[:, None])
    return np.argwhere(seen).astype(np.int32)


def block_width(counts, row_length: int) -> int:
    """M for rows with these block-pair counts: the largest, rounded up to half a row's blocks."""
    nb = -(-row_length // SPARSE_BLOCK)
    return _round_up(max(counts, default=1), max(nb // 2, 1), nb * (nb + 1) // 2)


def max_block_pairs(row_length: int) -> int:
    """Block pairs of a row one pair fills: the whole causal triangle (the most M can be)."""
    nb = -(-row_length // SPARSE_BLOCK)
    return nb * (nb + 1) // 2


def _round_up(value: int, step: int, cap: int) -> int:
    """value rounded up to a multiple of step (at least one step), at most cap: a width that
    takes few distinct values, so few shapes compile."""
    return min(max(-(-value // step) * step, step), cap)


def _first_scored(prompt: int) -> int:
    """Index of a completion's first scored token: a token at sequence index 0 has no predictor."""
    return 1 if prompt == 0 else 0


def _scored(prompt: int, completion: int) -> int:
    return max(completion - _first_scored(prompt), 0)


def make_rows(pairs, rows, *, layout: str, pad_id: int, row_length: int, max_pairs_per_row: int,
              score_width: int | None = None, groups: np.ndarray | None = None,
              attention_width: int | None = None) -> PackedBatch:
    """The row batch of `rows` (each an array of pair indices); format in the module docstring.

    score_width: N; None sizes it for `rows` (a process's share of a step passes the step's), and
    so does attention_width: M. groups: `score_groups` of these rows; None: one row per group.
    """
    check_layout(layout)
    if groups is None:
        groups = np.arange(len(rows))[:, None]
    if score_width is None:
        counts = np.array([scored_count(pairs, r) for r in rows], np.int64)
        score_width = row_score_width(counts[groups].sum(1), row_length, groups.shape[1])
    r, t, p = len(rows), row_length, max_pairs_per_row
    out = {k: np.zeros((r, t), np.int32) for k in ("positions", "segment_ids", "branch_ids")}
    out["input_ids"] = np.full((r, t), pad_id, np.int32)
    out["prompt_lengths"] = np.zeros((r, p), np.int32)
    out["completion_lengths"] = np.zeros((r, p, 2), np.int32)
    out["pair_mask"] = np.zeros((r, p), np.float32)
    scored = [_fill_row(out, b, row, pairs, layout, p) for b, row in enumerate(rows)]
    out["attention_blocks"] = _attention_blocks(pairs, rows, layout, t, attention_width)
    out.update(_pool_scores(scored, groups, score_width, pad_id, t, p))
    return PackedBatch(**out)


def _fill_row(out: dict, b: int, row, pairs, layout: str, max_pairs: int) -> list:
    """Writes row b's pairs into `out`; returns its scored tokens as (source index in the row,
    target token, score slot) arrays, one triple per completion."""
    if len(row) > max_pairs:
        raise ValueError(f"A row holds {len(row)} pairs, more than pack_max_pairs_per_row="
                         f"{max_pairs}.")
    at, scored, segment = 0, [], 0
    for slot, i in enumerate(row):
        prompt, completions = pairs.prompt_ids[i], (pairs.chosen_ids[i], pairs.rejected_ids[i])
        lp = len(prompt)
        out["prompt_lengths"][b, slot] = lp
        out["completion_lengths"][b, slot] = [len(c) for c in completions]
        out["pair_mask"][b, slot] = 1.0
        if layout == "shared_prompt":
            segment += 1
            _put(out, b, at, prompt, np.arange(lp), segment, 0)
            at += lp
            prompt_end = at - 1
        for side, comp in enumerate(completions):
            lc = len(comp)
            if layout == "packed":
                segment += 1
                _put(out, b, at, prompt, np.arange(lp), segment, 0)
                at += lp
                prompt_end = at - 1
                branch = 0
            else:
                branch = side + 1
            _put(out, b, at, comp, lp + np.arange(lc), segment, branch)
            # Completion token k sits at `at + k`; the token before it in its own sequence
            # predicts it: for k = 0 the last prompt token (in shared_prompt, for the rejected
            # side, not the token before it in the row).
            src = at + np.arange(lc) - 1
            if lc:
                src[0] = prompt_end
            k0 = _first_scored(lp)
            scored.append((src[k0:], comp[k0:], np.full(len(src[k0:]), 2 * slot + side)))
            at += lc
    return scored


def _attention_blocks(pairs, rows, layout: str, row_length: int, width: int | None) -> np.ndarray:
    """[R, M, 2] each row's attention block pairs, -1 padded; M = width, or sized for `rows`."""
    listed = [block_pairs(pairs, row, layout, row_length) for row in rows]
    if width is None:
        width = block_width([len(x) for x in listed], row_length)
    out = np.full((len(rows), width, 2), -1, np.int32)
    for b, x in enumerate(listed):
        if len(x) > width:
            raise ValueError(f"attention_width={width} is smaller than a row's "
                             f"{len(x)} attention block pairs.")
        out[b, :len(x)] = x
    return out


def _pool_scores(scored: list, groups: np.ndarray, n: int, pad_id: int, row_length: int,
                 max_pairs: int) -> dict:
    """score_index, score_target, score_slot [R/g, g*N]: each group's rows' scored tokens in turn,
    row k of a group with its row index offset by k * T and its pair slots by k * P."""
    g = groups.shape[1]
    out = {"score_index": np.zeros((len(groups), g * n), np.int32),
           "score_target": np.full((len(groups), g * n), pad_id, np.int32),
           "score_slot": np.full((len(groups), g * n), -1, np.int32)}
    offset = {"score_index": row_length, "score_target": 0, "score_slot": 2 * max_pairs}
    for j, members in enumerate(groups):
        for field, key in enumerate(SCORE_KEYS):
            parts = [np.asarray(triple[field], np.int64) + k * offset[key]
                     for k, b in enumerate(members) for triple in scored[b]]
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            if len(flat) > g * n:
                raise ValueError(f"score_width={n} is smaller than a score group's {len(flat)} "
                                 f"scored tokens over {g} rows.")
            out[key][j, :len(flat)] = flat
    return out


def _put(out, b, at, tokens, positions, segment, branch):
    end = at + len(tokens)
    out["input_ids"][b, at:end] = tokens
    out["positions"][b, at:end] = positions
    out["segment_ids"][b, at:end] = segment
    out["branch_ids"][b, at:end] = branch


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens / row slots (segment id 0 is padding)."""
    return float((batch.segment_ids > 0).mean())


def pair_tokens(batch: PackedBatch) -> int:
    """Tokens of the padded-equivalent work: prompt + chosen + prompt + rejected of real pairs."""
    per_pair = 2 * batch.prompt_lengths + batch.completion_lengths.sum(-1)
    return int((per_pair * batch.pair_mask).sum())


def check_layout(layout: str) -> None:
    if layout not in PACKED_LAYOUTS:
        raise ValueError(f"batch_layout={layout!r} has no packed rows; packed layouts: "
                         f"{PACKED_LAYOUTS} ('padded' batches come from simpo_jax.data.padded).")
