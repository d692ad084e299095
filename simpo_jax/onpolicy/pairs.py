"""Scored answers -> preference rows (best = chosen, worst = rejected), the split, and the report.

Rows follow the reference's on-policy data sets (princeton-nlp/SimPO on_policy_data_gen):
`prompt`, `all_generated_responses`, `all_rm_scores`, and `chosen` / `rejected` as message lists,
which data/formats.py reads as the "ultrafeedback" format.
"""

from __future__ import annotations

import json
import os

import numpy as np

DROP_REASONS = ("all_identical", "tied", "empty_answer")


def pick(responses: list[str], scores: list[float]) -> tuple[int, int, str]:
    """(chosen index, rejected index, "") or (-1, -1, drop reason).

    Unlike the reference (max and min with no check, so chosen can equal rejected), prompts whose
    answers are all the same, or whose best and worst scores tie, carry no preference and go.
    """
    if len(set(responses)) <= 1:
        return -1, -1, "all_identical"
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] == scores[worst]:
        return -1, -1, "tied"
    if not responses[best].strip() or not responses[worst].strip():
        return -1, -1, "empty_answer"  # the trainer drops empty messages; say so here
    return best, worst, ""


def make_rows(records: list[dict]) -> tuple[list[dict], dict]:
    """Preference rows of records {prompt_id, messages, prompt, responses, scores}; drop counts."""
    rows, dropped = [], {r: 0 for r in DROP_REASONS}
    for rec in records:
        best, worst, reason = pick(rec["responses"], rec["scores"])
        if reason:
            dropped[reason] += 1
            continue
        answer = lambda i: rec["messages"] + [{"role": "assistant", "content": rec["responses"][i]}]
        rows.append({"prompt": rec["prompt"], "prompt_id": rec["prompt_id"],
                     "all_generated_responses": rec["responses"],
                     "all_rm_scores": [float(s) for s in rec["scores"]],
                     "chosen": answer(best), "rejected": answer(worst),
                     "score_chosen": float(rec["scores"][best]),
                     "score_rejected": float(rec["scores"][worst])})
    return rows, dropped


def split(rows: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded shuffle by prompt id, the first round(fraction * n) rows to test."""
    rows = sorted(rows, key=lambda r: r["prompt_id"])
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = int(round(test_fraction * len(rows)))
    if test_fraction > 0 and len(rows) > 1:
        n_test = min(max(n_test, 1), len(rows) - 1)
    test = sorted(order[:n_test].tolist())
    keep = sorted(order[n_test:].tolist())
    return [rows[i] for i in keep], [rows[i] for i in test]


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    if not v.size:
        return {}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


def report(records: list[dict], rows: list[dict], dropped: dict, train: list, test: list,
           count_tokens) -> dict:
    """Prompts in, drops per reason, score statistics, token lengths of chosen vs rejected."""
    chosen_len = [count_tokens(r["chosen"][-1]["content"]) for r in rows]
    rejected_len = [count_tokens(r["rejected"][-1]["content"]) for r in rows]
    return {
        "prompts_in": len(records),
        "pairs": len(rows),
        "dropped": dict(dropped),
        "train": len(train),
        "test": len(test),
        "scores": {"all": _stats([s for r in records for s in r["scores"]]),
                   "chosen": _stats([r["score_chosen"] for r in rows]),
                   "rejected": _stats([r["score_rejected"] for r in rows]),
                   "margin": _stats([r["score_chosen"] - r["score_rejected"] for r in rows])},
        "mean_tokens": {"chosen": float(np.mean(chosen_len)) if rows else 0.0,
                        "rejected": float(np.mean(rejected_len)) if rows else 0.0},
        "chosen_longer_fraction": float(np.mean([c > r for c, r in zip(chosen_len, rejected_len)]))
        if rows else 0.0,
    }


def format_report(rep: dict) -> str:
    d = rep["dropped"]
    s = rep["scores"]
    lines = [f"on-policy pairs: {rep['prompts_in']} prompts in, {rep['pairs']} pairs "
             f"({rep['train']} train, {rep['test']} test); dropped: "
             + ", ".join(f"{k} {v}" for k, v in d.items())]
    if rep["pairs"]:
        lines.append(f"scores: chosen {s['chosen']['mean']:.4g}, rejected "
                     f"{s['rejected']['mean']:.4g}, margin {s['margin']['mean']:.4g} (mean); "
                     f"all answers {s['all']['mean']:.4g} +- {s['all']['std']:.3g}")
        lines.append(f"mean tokens: chosen {rep['mean_tokens']['chosen']:.1f}, rejected "
                     f"{rep['mean_tokens']['rejected']:.1f}; chosen longer in "
                     f"{rep['chosen_longer_fraction']:.0%} of pairs")
    return "\n".join(lines)


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
