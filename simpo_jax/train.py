"""The training loop: config -> data + model -> sharded state -> steps -> checkpoints -> export."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax import config as config_lib
from simpo_jax import data as data_lib
from simpo_jax import hub
from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax.models import generate
from simpo_jax import optim
from simpo_jax import report
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything a mode needs, built once from the config."""

    config: object
    mesh: object
    tokenizer: object
    data: object
    graphdef: object
    state: step_lib.TrainState
    state_shardings: step_lib.TrainState
    train_step: object
    eval_step: object
    total_steps: int
    global_batch: int
    eval_batch: int
    checkpointer: ckpt_lib.Checkpointer
    meta: dict
    start_step: int = 0


def resolve_path(path: str) -> str:
    """A relative path as given if it exists from here, else relative to the repository root."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def model_config(config, tokenizer) -> dict:
    """config.json fields of the model to train: the checkpoint's, or config.model_init's."""
    if config.model_name_or_path:
        path = resolve_path(config.model_name_or_path)
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    hf_config = config.model_init.to_dict()
    if hf_config["vocab_size"] < len(tokenizer):
        raise ValueError(f"config.model_init.vocab_size={hf_config['vocab_size']} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_config[name] = getattr(tokenizer, name)
    return hf_config


def load_params(config, tokenizer, mesh, *, weights: bool):
    """(graphdef, params): loaded into their shardings, or abstract when a checkpoint will fill them."""
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    remat = config.remat_policy if config.gradient_checkpointing else "none"
    kwargs = dict(dtype=dtype, param_dtype=jnp.float32, remat_policy=remat)
    hf_config = model_config(config, tokenizer)
    if not weights:
        model = nnx.eval_shape(lambda: models.from_config(hf_config, **kwargs))
    elif config.model_name_or_path:
        model = models.from_pretrained(resolve_path(config.model_name_or_path), mesh=mesh, **kwargs)
    else:
        model = models.from_config(hf_config, seed=config.model_init_seed, mesh=mesh, **kwargs)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def total_train_steps(config, steps_per_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * steps_per_epoch))


def build(config, *, with_data: bool = True, schedule=None) -> Run:
    """Mesh, tokenizer, data, model state (restored from a checkpoint when there is one), steps."""
    config_lib.validate(config)
    sharding_lib.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
    os.makedirs(config.output_dir, exist_ok=True)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config))
    dp = sharding_lib.data_parallel_size(mesh)
    global_batch = config.per_device_train_batch_size * dp * config.gradient_accumulation_steps
    eval_batch = config.per_device_eval_batch_size * dp
    if global_batch % jax.process_count() or eval_batch % jax.process_count():
        raise ValueError(f"The global batch of {global_batch} pairs does not split over "
                         f"{jax.process_count()} processes.")
    if with_data:
        print(f"effective batch size: {global_batch} pairs = per_device_train_batch_size "
              f"{config.per_device_train_batch_size} x {dp} data-parallel devices (mesh "
              f"{dict(mesh.shape)}) x gradient_accumulation_steps "
              f"{config.gradient_accumulation_steps}", flush=True)

    data_config = dataclasses.replace(
        data_lib.DataConfig.from_config(config),
        tokenizer_name_or_path=resolve_path(config.tokenizer_name_or_path
                                            or config.model_name_or_path))
    tokenizer = data_lib.load_tokenizer(data_config)
    data, total_steps = None, 1
    if with_data:
        data = data_lib.build_datasets(data_config, tokenizer)
        if jax.process_index() == 0:
            data_lib.write_report(data.report, config.output_dir)
        steps_per_epoch = data_lib.steps_per_epoch(data.train, global_batch)
        if steps_per_epoch < 1:
            raise ValueError(f"The training split has {data.train.num_pairs} pairs, fewer than one "
                             f"global batch of {global_batch}.")
        total_steps = total_train_steps(config, steps_per_epoch)

    checkpointer = ckpt_lib.Checkpointer(os.path.join(config.output_dir, "checkpoints"),
                                         save_total_limit=config.save_total_limit)
    restoring = bool(checkpointer.steps() or config.resume_from)
    graphdef, params = load_params(config, tokenizer, mesh, weights=not restoring)
    tx, schedule = optim.make_optimizer(optim.OptimConfig.from_config(config), total_steps,
                                        schedule)
    loss_cfg = loss_lib.LossConfig.from_config(config)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    train_step, state_sh = step_lib.jit_train_step(
        mesh, abstract_state, graphdef=graphdef, tx=tx, schedule=schedule, cfg=loss_cfg,
        accumulation_steps=config.gradient_accumulation_steps,
        logits_chunk_size=config.logits_chunk_size)
    if restoring:
        state = ckpt_lib.abstract_with_shardings(abstract_state, state_sh)
    else:
        state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    del params
    eval_step = step_lib.jit_eval_step(mesh, state_sh.params, graphdef=graphdef, cfg=loss_cfg,
                                       logits_chunk_size=config.logits_chunk_size)
    meta = {
        "model": json.loads(json.dumps(model_config(config, tokenizer), default=str)),
        "data_fingerprint": data.fingerprint if data else None,
        "global_batch": global_batch,
        "total_steps": total_steps,
        "seed": config.seed,
    }
    run = Run(config, mesh, tokenizer, data, graphdef, state, state_sh, train_step, eval_step,
              total_steps, global_batch, eval_batch, checkpointer, meta)
    run.start_step = resume(run, check=("model", "data_fingerprint", "global_batch", "seed")
                            if with_data else ("model",)) if restoring else 0
    if isinstance(jax.tree.leaves(run.state.params)[0], jax.ShapeDtypeStruct):
        # Every checkpoint was unreadable: start from the configured weights after all.
        log.warning("No checkpoint restored; starting from the configured model weights.")
        graphdef, params = load_params(config, tokenizer, mesh, weights=True)
        run.state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    return run


def resume(run: Run, check: tuple[str, ...]) -> int:
    """Restores the latest complete checkpoint (or config.resume_from); returns the start step."""
    config = run.config
    checkpointer, step = run.checkpointer, None
    if config.resume_from:
        path = os.path.abspath(resolve_path(config.resume_from))
        checkpointer = ckpt_lib.Checkpointer(os.path.dirname(path), save_total_limit=0)
        step = int(os.path.basename(path))

    def same_run(step, meta):
        for key in check:
            if meta.get(key) != run.meta[key]:
                raise ValueError(
                    f"Checkpoint {checkpointer.directory}/{step} was written with a different "
                    f"{key}: {_short(meta.get(key))} there, {_short(run.meta[key])} now. Use a new "
                    "output_dir, or restore the settings of that run.")

    restored = checkpointer.restore(run.state, step, check=same_run)
    if restored is None:
        return 0
    step, state, _ = restored
    run.state = state
    print(f"Resumed from {checkpointer.directory}/{step}.", flush=True)
    return step


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 300 else text[:300] + "..."


def to_global(batch: dict, shardings: dict) -> dict:
    """This process's rows of the global batch -> global jax.Arrays sharded over data x fsdp."""
    out = {}
    for k in step_lib.BATCH_KEYS:
        local = np.asarray(batch[k])
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[k] = jax.make_array_from_process_local_data(shardings[k], local, global_shape)
    return out


def prefetch(batches, shardings: dict, depth: int = 2):
    """Global device batches built by a background thread, `depth` steps ahead of the loop."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                item = to_global(batch, shardings)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except Exception as e:  # surfaced in the training thread
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


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


def check_finite(step: int, metrics: dict) -> None:
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
    if bad:
        raise FloatingPointError(
            f"Step {step}: {', '.join(bad)} is not finite ({', '.join(f'{k}={metrics[k]}' for k in bad)}). "
            "The run stopped without writing a checkpoint of this state. Lower learning_rate "
            "(e.g. 3e-7 instead of 5e-7 for 7B models) or beta (e.g. 1.0 instead of 2.0).")


def train(config) -> dict:
    """Trains per `config`; returns the final eval metrics. Output contract in the README."""
    run = build(config)
    start = run.start_step
    writer = report.MetricsWriter(config.output_dir, run.total_steps,
                                  report_to=tuple(config.report_to), run_config=config)
    if not run.data.eval.num_pairs:
        log.warning("No eval split (config.dataset_splits=%s has none with 'test' in its name, or "
                    "it is empty): training without evaluation.", list(config.dataset_splits))
    elif start == 0:
        eval_round(run, writer, 0)
    shardings = step_lib.batch_shardings(run.mesh)
    batches = prefetch(data_lib.train_batches(
        run.data.train, batch_size=run.global_batch // jax.process_count(), seed=config.seed,
        start_step=start, process_index=jax.process_index(), process_count=jax.process_count(),
        pad_id=run.data.pad_id, max_length=config.max_length,
        length_buckets=tuple(config.length_buckets)), shardings)

    pending = None  # (step, metrics on device): read one step late, after t+1 is dispatched
    last_time = time.time()

    def flush():
        nonlocal pending, last_time
        if pending is None:
            return
        step, metrics = pending
        pending = None
        metrics = jax.device_get(metrics)
        check_finite(step, metrics)
        now = time.time()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["tokens_per_second"] = metrics.pop("num_tokens") / max(now - last_time, 1e-9)
        last_time = now
        writer.progress(step, metrics)
        if step % config.logging_steps == 0 or step == run.total_steps:
            writer.write(step, metrics)

    with ckpt_lib.PreemptionGuard() as guard:
        for step in range(start + 1, run.total_steps + 1):
            batch = next(batches)
            run.state, metrics = run.train_step(run.state, batch)
            flush()
            pending = (step, metrics)
            if step % config.save_steps == 0 or step % config.eval_steps == 0:
                flush()  # never checkpoint a step whose metrics were not checked
            if guard.should_stop(step):
                flush()
                run.checkpointer.save(step, run.state, run.meta)
                run.checkpointer.close()
                writer.close()
                print(f"Stopped by {guard.signal_name} after step {step}/{run.total_steps}; "
                      f"checkpoint saved in {run.checkpointer.directory}/{step}. Rerun the same "
                      "command to resume from it.", flush=True)
                return {"preempted_at_step": step}
            if step % config.save_steps == 0 and step != run.total_steps:
                run.checkpointer.save(step, run.state, run.meta)
            if step % config.eval_steps == 0 and step != run.total_steps:
                eval_round(run, writer, step)
        flush()
    final = eval_round(run, writer, run.total_steps)
    if start < run.total_steps:
        run.checkpointer.save(run.total_steps, run.state, run.meta)
    run.checkpointer.close()
    if jax.process_index() == 0:
        with open(os.path.join(config.output_dir, "eval_results.json"), "w") as f:
            json.dump(final, f, indent=2)
    writer.close()
    export(run, eval_metrics=final)
    return final


def export(run: Run, out_dir: str | None = None, eval_metrics: dict | None = None) -> str:
    """Writes the current parameters as a Hugging Face folder with a model card; pushes if asked."""
    config = run.config
    out_dir = out_dir or config.output_dir
    model = nnx.merge(run.graphdef, run.state.params)
    models.save_pretrained(model, out_dir, tokenizer=run.tokenizer, dtype=config.export_dtype,
                           max_shard_size=config.max_shard_size)
    if jax.process_index() == 0:
        hub.write_model_card(out_dir, config, eval_metrics or hub.read_eval_metrics(config.output_dir),
                             run.global_batch)
        if config.push_to_hub:
            url = hub.push(out_dir, config.hub_model_id, private=config.hub_private_repo)
            print(f"Pushed {out_dir} to {url}", flush=True)
    return out_dir


def export_checkpoint(config) -> str:
    """--mode=export: the latest checkpoint (or config.resume_from) as a Hugging Face folder."""
    run = build(config, with_data=False)
    if run.start_step == 0 and not config.resume_from:
        raise ValueError(f"No checkpoint to export under {run.checkpointer.directory}; train first "
                         "or set config.resume_from to a checkpoint step folder.")
    run.checkpointer.close()
    out_dir = export(run, config.export_dir or config.output_dir)
    print(f"Exported step {run.start_step} to {out_dir} ({config.export_dtype}).", flush=True)
    return out_dir


def evaluate_checkpoint(config) -> dict:
    """--mode=eval: metrics of the latest checkpoint (or the initial model) over the eval split."""
    run = build(config)
    metrics = evaluate(run)
    run.checkpointer.close()
    report.MetricsWriter(config.output_dir, run.total_steps).write(run.start_step, metrics,
                                                                    prefix="eval_")
    return metrics


def lr_find(config) -> dict:
    """--mode=lr_find: the LR range test on real SimPO steps, in <output_dir>/lr_find.

    The learning rate grows exponentially from lr_find_min to lr_find_max over lr_find_steps
    steps, starting from the configured weights (never from, or into, the run's checkpoints); the
    sweep stops early once the loss diverges. Writes lr_find.json and lr_find.png there.
    """
    import shutil

    from simpo_jax import plots

    out = os.path.join(config.output_dir, "lr_find")
    if jax.process_index() == 0 and os.path.exists(out):
        shutil.rmtree(out)
    sweep = config.copy_and_resolve_references()
    sweep.unlock()
    sweep.output_dir, sweep.resume_from, sweep.max_steps = out, "", config.lr_find_steps
    sweep.lock()
    schedule = optim.range_test_schedule(config.lr_find_min, config.lr_find_max,
                                         config.lr_find_steps)
    run = build(sweep, schedule=schedule)
    run.checkpointer.close()
    batches = prefetch(data_lib.train_batches(
        run.data.train, batch_size=run.global_batch // jax.process_count(), seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        pad_id=run.data.pad_id, max_length=config.max_length,
        length_buckets=tuple(config.length_buckets)), step_lib.batch_shardings(run.mesh))
    lrs, losses = [], []
    for step in range(config.lr_find_steps):
        run.state, metrics = run.train_step(run.state, next(batches))
        loss = float(metrics["loss"])
        lrs.append(float(metrics["learning_rate"]))
        losses.append(loss)
        if not math.isfinite(loss) or (step > 10 and loss > 4 * min(losses)):
            break  # diverged: the rest of the sweep says nothing new
    suggestion = plots.suggest_lr(lrs, losses)
    result = {"suggested_learning_rate": suggestion, "learning_rates": lrs, "losses": losses}
    if jax.process_index() == 0:
        with open(os.path.join(out, "lr_find.json"), "w") as f:
            json.dump(result, f, indent=2)
        plots.plot_lr_find(lrs, losses, suggestion, os.path.join(out, "lr_find.png"))
        print(f"LR range test over {len(lrs)} steps ({lrs[0]:.2e} to {lrs[-1]:.2e}): suggested "
              f"learning_rate {suggestion:.2e} (steepest loss decrease). Plot: "
              f"{os.path.join(out, 'lr_find.png')}", flush=True)
    return result
