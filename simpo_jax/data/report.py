"""The data report: rows read, kept and dropped per split, truncations, token length percentiles,
duplicate rows and train/test overlap; printed as a table and written as
output_dir/data_report.json."""

import hashlib
import json
import os

import numpy as np

from simpo_jax.errors import UserError

EXAMPLES_PER_REASON = 5
TRUNCATION_WARNING_FRACTION = 0.05  # the console table warns above this fraction of truncated pairs
REPEAT_WARNING_FRACTION = 0.01  # ... and above this fraction of duplicate or train/test shared rows
# Drops caused by the length budget, not by bad rows: they do not count toward max_dropped_fraction
# (raising max_length keeps them), and the table warns about each one.
LENGTH_BUDGET_REASONS = ("identical_after_truncation",)


def new_split(split) -> dict:
    """The report of one split before any row is read."""
    return dict(split=split, rows_read=0, rows_kept=0, dropped={}, dropped_examples={}, formats={})


def drop(report: dict, reason: str, label: str) -> None:
    """Counts a dropped row under its reason, keeping a few example rows."""
    report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
    examples = report["dropped_examples"].setdefault(reason, [])
    if len(examples) < EXAMPLES_PER_REASON:
        examples.append(label)


def length_stats(pairs) -> dict:
    """Token length percentiles (p50, p90, p99, max) of prompts, completions and whole pairs."""
    if not pairs.num_pairs:
        return {"token_lengths": {}}
    p = np.array([len(x) for x in pairs.prompt_ids])
    c = np.array([len(x) for x in pairs.chosen_ids])
    r = np.array([len(x) for x in pairs.rejected_ids])
    stats = {}
    for name, values in (("prompt", p), ("chosen", c), ("rejected", r),
                         ("total", p + np.maximum(c, r))):
        q = np.percentile(values, [50, 90, 99])
        stats[name] = dict(p50=float(q[0]), p90=float(q[1]), p99=float(q[2]), max=int(values.max()))
    return {"token_lengths": stats}


def row_digests(records: list) -> tuple:
    """Per record: digests of (prompt, chosen, rejected) and of the prompt, as two lists."""
    digest = lambda *parts: hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(),
                                            digest_size=16).digest()
    return ([digest(r["chat"], r["prompt"], r["chosen"], r["rejected"]) for r in records],
            [digest(r["chat"], r["prompt"]) for r in records])


def count_repeats(report: dict, digests: dict) -> None:
    """Counts each split's exact duplicate rows and the eval rows whose pair or prompt is in train.

    `digests`: role -> row_digests(records of the split). Counting only: duplicates still train.
    """
    for role, (pairs, _) in digests.items():
        report["splits"][role]["duplicate_rows"] = len(pairs) - len(set(pairs))
    train_pairs, train_prompts = (set(d) for d in digests["train"])
    eval_pairs, eval_prompts = digests["eval"]
    report["train_test_overlap"] = dict(pairs=sum(d in train_pairs for d in eval_pairs),
                                        prompts=sum(d in train_prompts for d in eval_prompts),
                                        eval_rows=len(eval_pairs))


def check_dropped(report: dict, max_dropped_fraction: float) -> None:
    """Sets each split's dropped_fraction (bad rows only, not LENGTH_BUDGET_REASONS); UserError
    above max_dropped_fraction."""
    for role, s in report["splits"].items():
        budget = sum(s["dropped"].get(r, 0) for r in LENGTH_BUDGET_REASONS)
        dropped = sum(s["dropped"].values()) - budget
        s["dropped_by_length_budget"] = budget
        s["dropped_fraction"] = dropped / s["rows_read"] if s["rows_read"] else 0.0
        if s["dropped_fraction"] > max_dropped_fraction:
            raise UserError(
                f"{s['dropped_fraction']:.1%} of the {s['rows_read']} rows of the {role} split "
                f"{s['split']!r} were dropped ({dropped}), more than max_dropped_fraction="
                f"{max_dropped_fraction}. Top reasons: {reasons(s, counted_only=True)}. Fix the "
                "data, choose data_format, or raise max_dropped_fraction.")


def budget_advice(settings: dict) -> str:
    """How to give completions more room: what the length-budget warnings and errors advise."""
    return (f"raise max_length={settings['max_length']}, or lower max_prompt_length="
            f"{settings['max_prompt_length']} to leave more of it to the completions "
            "(truncation_mode only picks which end of a long prompt stays)")


def reasons(split_report: dict, counted_only: bool = False) -> str:
    """The three commonest drop reasons of a split, with counts and example rows."""
    top = sorted(((k, v) for k, v in split_report["dropped"].items()
                  if not (counted_only and k in LENGTH_BUDGET_REASONS)), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"{reason}: {n} (e.g. rows {', '.join(split_report['dropped_examples'][reason])})"
                     for reason, n in top)


def format_report(report: dict) -> str:
    """A short table: rows, truncations and drops per split, token length percentiles, padding
    efficiency; then the warnings."""
    lines = [f"{'split':<6} {'read':>7} {'kept':>7}  {'truncated prompts':>17}  "
             f"{'truncated completions':>21}  dropped"]
    for role, s in report["splits"].items():
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-"
        prompts, completions = s.get("prompt_truncated", 0), s.get("completion_truncated", 0)
        lines.append(f"{role:<6} {s['rows_read']:>7} {s['rows_kept']:>7}  {prompts:>17}  "
                     f"{completions:>21}  {drops}")
    lines.append(f"{'tokens':<15} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
    for role, s in report["splits"].items():
        for name, q in s["token_lengths"].items():
            lines.append(f"{role + ' ' + name:<15} {q['p50']:>6.0f} {q['p90']:>6.0f} "
                         f"{q['p99']:>6.0f} {q['max']:>6}")
    pad = report.get("padding_efficiency", {})
    lines.append("padding efficiency (batch of {}): ".format(pad.get("batch_size")) + ", ".join(
        f"{k} {v:.1%}" for k, v in pad.items() if k != "batch_size"))
    return "\n".join(lines + warnings(report))


def warnings(report: dict) -> list:
    """Lines "warning: ...": over TRUNCATION_WARNING_FRACTION of a split's pairs cut, any pair
    dropped for the length budget, over REPEAT_WARNING_FRACTION duplicate or shared rows."""
    out, settings = [], report["settings"]
    for role, s in report["splits"].items():
        prompts, completions = s.get("prompt_truncated", 0), s.get("completion_truncated", 0)
        if s.get("truncated_fraction", 0) > TRUNCATION_WARNING_FRACTION:
            out.append(
                f"warning: {s['truncated_fraction']:.1%} of the {role} pairs are truncated "
                f"({prompts} prompts cut to max_prompt_length={settings['max_prompt_length']} "
                f"tokens, {completions} completions cut at max_length={settings['max_length']} "
                "tokens), so the model sees cut text; raise max_prompt_length and max_length, or "
                "filter the long rows out of the data.")
        identical = s["dropped"].get("identical_after_truncation", 0)
        if identical:
            out.append(
                f"warning: {_share(identical, s['rows_read'], role + ' pairs')} were dropped: "
                "chosen and rejected are identical after truncation (the completions share a "
                "start longer than the room max_length leaves them, so their margin is 0 whatever "
                f"the model); {budget_advice(settings)}.")
        if s.get("duplicate_rows", 0) > REPEAT_WARNING_FRACTION * s["rows_read"]:
            out.append(
                f"warning: {_share(s['duplicate_rows'], s['rows_read'], role + ' rows')} repeat "
                "an earlier row of the split exactly (prompt, chosen and rejected); they are "
                "kept, so those pairs weigh more; deduplicate the data if that is not intended.")
    return out + _overlap_warnings(report.get("train_test_overlap"))


def _overlap_warnings(overlap) -> list:
    """Warnings for eval rows that repeat a train row, or whose prompt is in the train split."""
    if not overlap or not overlap["eval_rows"]:
        return []
    out, limit = [], REPEAT_WARNING_FRACTION * overlap["eval_rows"]
    if overlap["pairs"] > limit:
        out.append(f"warning: {_share(overlap['pairs'], overlap['eval_rows'], 'eval rows')} are "
                   "also train rows (same prompt, chosen and rejected): eval metrics on them "
                   "measure memorisation; remove them from one split.")
    if overlap["prompts"] > limit:
        out.append(f"warning: {_share(overlap['prompts'], overlap['eval_rows'], 'eval rows')} "
                   "have a prompt that is also in the train split: eval metrics do not measure "
                   "unseen prompts.")
    return out


def _share(count: int, total: int, noun: str) -> str:
    return f"{count} of the {total} {noun} ({count / total:.1%})"


def write_report(report: dict, output_dir: str) -> str:
    """Prints the table and writes output_dir/data_report.json; returns the file's path."""
    print(format_report(report), flush=True)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "data_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return path
