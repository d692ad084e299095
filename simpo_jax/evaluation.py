"""Evaluation over the whole eval split, and greedy sample generations."""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from simpo_jax import loss as loss_lib
from simpo_jax import report
from simpo_jax import run_folder
from simpo_jax.build import MODEL_CHECKS, Run, build
from simpo_jax.data import feed, padded
from simpo_jax.data.batch import batch_shardings
from simpo_jax.errors import UserError
from simpo_jax.models import generate
from simpo_jax.paths import RunDir


def evaluate(run: Run, stop=None) -> dict | None:
    """Metrics over the whole eval split (padding pairs excluded); {} when there is none; None when
    `stop()` (asked between batches) cut it short."""
    if not run.data.eval.num_pairs:
        return {}
    shardings = batch_shardings(run.mesh)
    total = None
    for batch in padded.eval_batches(
            run.data.eval, batch_size=run.eval_batch // jax.process_count(),
            pad_id=run.data.pad_id, max_length=run.config.max_length,
            length_buckets=tuple(run.config.length_buckets),
            process_index=jax.process_index(), process_count=jax.process_count()):
        if stop is not None and stop():
            return None
        sums = run.eval_step(run.state.params, feed.to_global(batch, shardings))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    metrics = loss_lib.finalize_metrics(total, loss_lib.LossConfig.from_config(run.config))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def eval_round(run: Run, writer: report.MetricsWriter, step: int, stop=None) -> dict | None:
    """Eval metrics over the whole split and sample generations, written to output_dir; None when
    `stop()` cut it short. The samples are written before the eval row, so a step's eval row in
    metrics.jsonl means its samples are complete too."""
    metrics = evaluate(run, stop)
    if metrics:
        samples = write_samples(run, step)
        writer.write(step, metrics, prefix="eval_")
        writer.write_samples(step, samples)
    return metrics


def write_samples(run: Run, step: int) -> list[dict]:
    """Greedy completions of the first eval prompts, appended to <output_dir>/samples.jsonl."""
    config = run.config
    prompts = [list(map(int, p)) for p in run.data.eval.prompt_ids[:config.num_samples]]
    if not prompts:
        return []
    model = run.model()  # with LoRA, the adapters on the frozen base
    pad = run.data.pad_id
    tokens = generate.greedy_generate(model, prompts, max_new_tokens=config.sample_max_new_tokens,
                                      eos_token_id=run.tokenizer.eos_token_id, pad_token_id=pad)
    if jax.process_index() != 0:
        return []
    rows = []
    for prompt, new in zip(prompts, np.asarray(tokens)):
        new = list(map(int, new))
        if run.tokenizer.eos_token_id in new:
            new = new[:new.index(run.tokenizer.eos_token_id) + 1]
        rows.append({"step": step, "prompt": run.tokenizer.decode(prompt),
                     "completion": run.tokenizer.decode(new, skip_special_tokens=True)})
    with open(RunDir(config.output_dir).samples, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def evaluate_checkpoint(config) -> dict:
    """--mode=eval: metrics of the latest checkpoint (or config.resume_from) over the eval split.

    Printed; appended to metrics.jsonl only when it holds no eval row for that step yet (training
    writes one at every evaluation and at the end, so a finished run gets no duplicate); written
    to eval_results.json (the metrics the model card reports) unless config.resume_from chose
    the checkpoint.
    """
    # Evaluating reads the model only: another device count, batch or layout than training's is fine.
    run = build(config, checks=MODEL_CHECKS)
    run.checkpointer.close()
    try:
        return _evaluate_checkpoint(config, run)
    finally:
        run_folder.release(config.output_dir)


def _evaluate_checkpoint(config, run: Run) -> dict:
    if run.start_step == 0 and not config.resume_from:
        raise UserError(f"--mode=eval: no checkpoint restored from {run.checkpointer.directory}; "
                        "train first or set config.resume_from to a checkpoint step folder.")
    if not run.data.eval.num_pairs:
        raise UserError(f"--mode=eval: no eval split (config.dataset_splits="
                        f"{list(config.dataset_splits)} has no name containing 'test', or it is "
                        "empty); name the data's test split there.")
    metrics = evaluate(run)
    if jax.process_index() != 0:
        return metrics
    writer = report.MetricsWriter(config.output_dir, run.total_steps, stream=io.StringIO())
    logged = has_eval_row(writer.path, run.start_step)
    if not logged:
        writer.write(run.start_step, metrics, prefix="eval_")
    writer.close()
    written = ["metrics.jsonl already holds this step's eval row" if logged else
               "appended to metrics.jsonl"]
    if not config.resume_from:
        report.write_eval_results(config.output_dir, metrics)
        written.append("written to eval_results.json")
    print(f"eval of checkpoint {run.checkpointer.directory}/{run.start_step} "
          f"({run.data.eval.num_pairs} pairs): "
          + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f" ({'; '.join(written)})",
          flush=True)
    return metrics


def has_eval_row(metrics_path: str, step: int) -> bool:
    """Whether a metrics.jsonl holds an eval row for `step`."""
    return read_eval_row(metrics_path, step) is not None


def read_eval_row(metrics_path: str, step: int) -> dict | None:
    """The eval metrics (without the eval_ prefix) a metrics.jsonl holds for `step`, or None."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(row, dict) and row.get("step") == step and any(
                    k.startswith("eval_") for k in row):
                return {k[len("eval_"):]: (float(v) if isinstance(v, str) else v)
                        for k, v in row.items() if k.startswith("eval_")}
    return None
