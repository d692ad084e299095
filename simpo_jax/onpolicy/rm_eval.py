"""--mode=rm_eval: the trained policy against a baseline on held-out prompts, judged by a reward model.

An offline stand-in for AlpacaEval: one answer per prompt from the latest checkpoint (sampled with
the generation_* settings and the first seed) and one from the baseline (model_name_or_path
sampled the same way, or the data's chosen answers); the reward model scores both; a win counts
1, a tie 1/2. Written to <output_dir>/rm_eval.json (summary), rm_eval_answers.jsonl (per prompt)
and rm_eval.png.
"""

from __future__ import annotations

import gc
import json
import os

import jax
import numpy as np

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax.errors import UserError
from simpo_jax.paths import RunDir
from simpo_jax.onpolicy import generate as generate_lib
from simpo_jax.onpolicy import pairs as pairs_lib
from simpo_jax.data import rows, tokenize

Z_95 = 1.959964  # two-sided 95% normal quantile


def win_rate(policy_scores, baseline_scores) -> dict:
    """Win rate (ties count 1/2) with a 95% normal-approximation interval of the per-prompt mean."""
    p, b = np.asarray(policy_scores, np.float64), np.asarray(baseline_scores, np.float64)
    outcome = (p > b) + 0.5 * (p == b)
    n = len(outcome)
    rate = float(outcome.mean()) if n else float("nan")
    half = float(Z_95 * outcome.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"win_rate": rate, "ci95": [max(0.0, rate - half), min(1.0, rate + half)],
            "wins": int((p > b).sum()), "ties": int((p == b).sum()), "losses": int((p < b).sum()),
            "num_prompts": n}


def _answers(config, prompts, *, checkpoint: bool):
    """(answers, source, tokenizer, mesh) of the policy (checkpoint) or the base model."""
    model, tokenizer, mesh, source, stops = generate_lib.load_policy(config, checkpoint=checkpoint)
    ids = [tokenize.prompt_token_ids(tokenizer, p["messages"], config.max_prompt_length,
                                     config.truncation_mode)[0] for p in prompts]
    seed = int(config.generation_seeds[0])
    new = generate_lib.sample_answers(config, model, tokenizer, mesh, stops, ids,
                                      [seed] * len(ids),
                                      [int(p["prompt_id"][:8], 16) for p in prompts],
                                      progress=" (rm_eval)")
    del model
    gc.collect()
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new], source, tokenizer, mesh


def plot(path: str, policy_scores, baseline_scores, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    diff = np.asarray(policy_scores) - np.asarray(baseline_scores)
    ax.hist(diff, bins=min(40, max(5, len(diff) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    lo, hi = summary["ci95"]
    ax.set_title(f"policy - baseline reward: win rate {summary['win_rate']:.1%} "
                 f"[{lo:.1%}, {hi:.1%}]", fontsize=10)
    ax.set_xlabel("reward difference per prompt")
    ax.set_ylabel("prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rm_eval(config) -> dict:
    """--mode=rm_eval; returns the summary written to rm_eval.json."""
    if not config.reward_model_name_or_path:
        raise UserError("--mode=rm_eval needs config.reward_model_name_or_path (a transformers "
                        "*ForSequenceClassification folder or Hub id).")
    checkpoints = ckpt_lib.saved_steps(RunDir(config.output_dir).checkpoints)
    if not checkpoints and not config.resume_from:
        raise UserError(f"--mode=rm_eval: no checkpoint in {config.output_dir}/checkpoints to "
                        "judge; train first, or set config.resume_from to a checkpoint step folder.")
    generate_lib.check_reward_model(config)
    prompts = rows.load_prompts(config, "test")
    if config.rm_eval_num_prompts:
        prompts = prompts[:config.rm_eval_num_prompts]
    if not prompts:
        raise UserError(f"--mode=rm_eval: no held-out prompts: config.dataset_splits="
                        f"{list(config.dataset_splits)} names no test split of dataset_mixer, or "
                        "it is empty.")
    policy, source, tokenizer, mesh = _answers(config, prompts, checkpoint=True)
    if config.rm_eval_baseline == "chosen":
        missing = sum(p["chosen"] is None for p in prompts)
        if missing:
            raise UserError(f"config.rm_eval_baseline='chosen': {missing} of the {len(prompts)} "
                            "test rows have no chosen answer; use rm_eval_baseline='model'.")
        baseline, baseline_source = [p["chosen"] for p in prompts], "the data's chosen answers"
    else:
        baseline, baseline_source, _, _ = _answers(config, prompts, checkpoint=False)
    model, rm_tokenizer = generate_lib.load_reward_model(config, mesh)
    items = [(p["messages"], a) for p, a in zip(prompts + prompts, policy + baseline)]
    scores = generate_lib.score_answers(config, model, rm_tokenizer, mesh, items)
    policy_scores, baseline_scores = scores[:len(prompts)], scores[len(prompts):]
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    summary = {"policy": source, "baseline": baseline_source,
               "reward_model": config.reward_model_name_or_path,
               **win_rate(policy_scores, baseline_scores),
               "mean_score": {"policy": float(np.mean(policy_scores)),
                              "baseline": float(np.mean(baseline_scores))},
               "mean_tokens": {"policy": float(np.mean([count(a) for a in policy])),
                               "baseline": float(np.mean([count(a) for a in baseline]))}}
    if jax.process_index() == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "rm_eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
        pairs_lib.write_jsonl(os.path.join(config.output_dir, "rm_eval_answers.jsonl"), [
            {"prompt": p["prompt"], "policy": a, "baseline": b, "policy_score": sa,
             "baseline_score": sb}
            for p, a, b, sa, sb in zip(prompts, policy, baseline, policy_scores, baseline_scores)])
        plot(os.path.join(config.output_dir, "rm_eval.png"), policy_scores, baseline_scores,
             summary)
        lo, hi = summary["ci95"]
        print(f"rm_eval: {source} vs {baseline_source} on {len(prompts)} prompts: win rate "
              f"{summary['win_rate']:.1%} (95% CI {lo:.1%}-{hi:.1%}; {summary['wins']} wins, "
              f"{summary['ties']} ties, {summary['losses']} losses); mean tokens "
              f"{summary['mean_tokens']['policy']:.1f} vs {summary['mean_tokens']['baseline']:.1f}; "
              f"written to {config.output_dir}/rm_eval.json", flush=True)
    return summary
