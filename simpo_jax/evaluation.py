"""Evaluation over the whole eval split, and greedy sample generations."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simpo_jax import data as data_lib
from simpo_jax import loss as loss_lib
from simpo_jax import report
from simpo_jax import step as step_lib
from simpo_jax.build import Run, build, to_global
from simpo_jax.models import generate


def evaluate(run: Run) -> dict:
    """Metrics over the whole eval split (padding pairs excluded); {} when there is none."""
    if not run.data.eval.num_pairs:
        return {}
    shardings = step_lib.batch_shardings(run.mesh)
    total = None
    for batch in data_lib.eval_batches(
            run.data.eval, batch_size=run.eval_batch // jax.process_count(),
            pad_id=run.data.pad_id, max_length=run.config.max_length,
            length_buckets=tuple(run.config.length_buckets),
            process_index=jax.process_index(), process_count=jax.process_count()):
        sums = run.eval_step(run.state.params, to_global(batch, shardings))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    metrics = loss_lib.finalize_metrics(total, loss_lib.LossConfig.from_config(run.config))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def eval_round(run: Run, writer: report.MetricsWriter, step: int) -> dict:
    """Eval metrics over the whole split and sample generations, written to output_dir."""
    metrics = evaluate(run)
    if metrics:
        writer.write(step, metrics, prefix="eval_")
        writer.write_samples(step, write_samples(run, step))
    return metrics


def write_samples(run: Run, step: int) -> list[dict]:
    """Greedy completions of the first eval prompts, appended to <output_dir>/samples.jsonl."""
    config = run.config
    prompts = [list(map(int, p)) for p in run.data.eval.prompt_ids[:config.num_samples]]
    if not prompts:
        return []
    model = nnx.merge(run.graphdef, run.state.params)
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
    with open(os.path.join(config.output_dir, "samples.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def evaluate_checkpoint(config) -> dict:
    """--mode=eval: metrics of the latest checkpoint (or the initial model) over the eval split."""
    run = build(config)
    metrics = evaluate(run)
    run.checkpointer.close()
    report.MetricsWriter(config.output_dir, run.total_steps).write(run.start_step, metrics,
                                                                    prefix="eval_")
    return metrics
