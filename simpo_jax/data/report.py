"""The data report: rows read, kept and dropped per split, truncations, token length percentiles;
printed as a table and written as output_dir/data_report.json."""

import json
import os

import numpy as np

from simpo_jax.errors import UserError

EXAMPLES_PER_REASON = 5
TRUNCATION_WARNING_FRACTION = 0.05  # the console table warns above this fraction of truncated pairs


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


def check_dropped(report: dict, max_dropped_fraction: float) -> None:
    """Sets each split's dropped_fraction; UserError above max_dropped_fraction."""
    for role, s in report["splits"].items():
        dropped = sum(s["dropped"].values())
        s["dropped_fraction"] = dropped / s["rows_read"] if s["rows_read"] else 0.0
        if s["dropped_fraction"] > max_dropped_fraction:
            raise UserError(
                f"{s['dropped_fraction']:.1%} of the {s['rows_read']} rows of the {role} split "
                f"{s['split']!r} were dropped ({dropped}), more than max_dropped_fraction="
                f"{max_dropped_fraction}. Top reasons: {reasons(s)}. Fix the data, choose "
                "data_format, or raise max_dropped_fraction.")


def reasons(split_report: dict) -> str:
    """The three commonest drop reasons of a split, with counts and example rows."""
    top = sorted(split_report["dropped"].items(), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"{reason}: {n} (e.g. rows {', '.join(split_report['dropped_examples'][reason])})"
                     for reason, n in top)


def format_report(report: dict) -> str:
    """A short table: rows, truncations and drops per split, token length percentiles, padding
    efficiency; warnings when more than TRUNCATION_WARNING_FRACTION of a split's pairs are cut."""
    lines = [f"{'split':<6} {'read':>7} {'kept':>7}  {'truncated prompts':>17}  "
             f"{'truncated completions':>21}  dropped"]
    warnings = []
    for role, s in report["splits"].items():
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-"
        prompts, completions = s.get("prompt_truncated", 0), s.get("completion_truncated", 0)
        lines.append(f"{role:<6} {s['rows_read']:>7} {s['rows_kept']:>7}  {prompts:>17}  "
                     f"{completions:>21}  {drops}")
        if s.get("truncated_fraction", 0) > TRUNCATION_WARNING_FRACTION:
            settings = report["settings"]
            warnings.append(
                f"warning: {s['truncated_fraction']:.1%} of the {role} pairs are truncated "
                f"({prompts} prompts cut to max_prompt_length={settings['max_prompt_length']} "
                f"tokens, {completions} completions cut at max_length={settings['max_length']} "
                "tokens), so the model sees cut text; raise max_prompt_length and max_length, or "
                "filter the long rows out of the data.")
    lines.append(f"{'tokens':<15} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
    for role, s in report["splits"].items():
        for name, q in s["token_lengths"].items():
            lines.append(f"{role + ' ' + name:<15} {q['p50']:>6.0f} {q['p90']:>6.0f} "
                         f"{q['p99']:>6.0f} {q['max']:>6}")
    pad = report.get("padding_efficiency", {})
    lines.append("padding efficiency (batch of {}): ".format(pad.get("batch_size")) + ", ".join(
        f"{k} {v:.1%}" for k, v in pad.items() if k != "batch_size"))
    return "\n".join(lines + warnings)


def write_report(report: dict, output_dir: str) -> str:
    """Prints the table and writes output_dir/data_report.json; returns the file's path."""
    print(format_report(report), flush=True)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "data_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return path
