"""The training loop and the modes around it: train, export."""

from __future__ import annotations

import logging
import os
import time

import jax

from simpo_jax import doctor
from simpo_jax import flops
from simpo_jax import health as health_lib
from simpo_jax import lora as lora_lib
from simpo_jax import models
from simpo_jax import plots
from simpo_jax import precision
from simpo_jax import report
from simpo_jax import run_folder
from simpo_jax.build import Run, build
from simpo_jax.evaluation import eval_round, read_eval_row
from simpo_jax.errors import UserError
from simpo_jax.hub import publish
from simpo_jax.paths import RunDir
from simpo_jax.preemption import PreemptionGuard

log = logging.getLogger(__name__)


def start_doctor(run: Run) -> doctor.Advisor:
    """Prints the config warnings; an Advisor that remembers advice given before a resume."""
    # The model's size (with LoRA, the frozen base too): the guides' rows are by model size.
    num_params = sum(x.size for x in jax.tree.leaves((run.state.params, run.frozen)))
    for warning in doctor.config_warnings(run.config, num_params=num_params,
                                          effective_batch=run.global_batch):
        log.warning("doctor: %s", warning)
    advisor = doctor.Advisor(learning_rate=run.config.learning_rate, beta=run.config.beta,
                             num_params=num_params)
    if run.restored_meta and "advisor" in run.restored_meta:
        advisor.load_state_dict(run.restored_meta["advisor"])
    return advisor


def utilisation_basis(run: Run, arch) -> tuple[float, float]:
    """(model FLOPs per trained token, peak FLOP/s of the whole mesh) for the `mfu` metric."""
    lengths = run.data.train.lengths()
    flops_per_token = flops.model_flops_per_token(arch, seq_len=int(lengths.mean()))
    device = run.mesh.devices.flat[0]
    per_device, source = flops.peak_flops_per_device(
        device, "bfloat16" if run.config.bf16 else "float32")
    # Simulated CPU devices share the host's cores: the measured matmul rate is the host's peak.
    peak = per_device if device.platform == "cpu" else per_device * run.mesh.devices.size
    log.info("MFU basis: %.3g model FLOPs per token, peak %.3g FLOP/s (%s)", flops_per_token,
             peak, source)
    return flops_per_token, peak


def train(config) -> dict:
    """Trains per `config`; returns the final eval metrics. Output contract in the README.

    SIGTERM/SIGINT from the first step to the push: the run saves and stops cleanly (its result
    holds "preempted_at_step"). An unhealthy run raises health.RunUnhealthy.
    """
    run = build(config, fresh=True)
    try:
        with PreemptionGuard() as guard:
            return _train(run, guard)
    finally:  # an error still completes the checkpoints already being written
        run.checkpointer.close()
        run_folder.release(config.output_dir)


# The fields that shape the learning-rate schedule: a resume that changes them is warned about.
SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
                   "max_steps", "num_train_epochs")


def schedule(run: Run) -> dict:
    """The schedule-shaping fields of this run, as saved in each checkpoint's meta."""
    fields = {f: getattr(run.config, f) for f in SCHEDULE_FIELDS}
    return {**{k: str(v) if isinstance(v, str) else v for k, v in fields.items()},
            "total_steps": run.total_steps}


def warn_schedule_change(run: Run) -> None:
    """A resume under a changed schedule continues from its step with the new values: said once."""
    before = (run.restored_meta or {}).get("schedule") or {}
    now = schedule(run)
    changed = [f"{k} {before[k]} -> {now[k]}" for k in now if k in before and before[k] != now[k]]
    if changed:
        log.warning("Resuming step %d with a changed learning-rate schedule: %s. The schedule "
                    "continues from step %d with the new values.", run.start_step,
                    ", ".join(changed), run.start_step)


def _train(run: Run, guard: PreemptionGuard) -> dict:
    config, start = run.config, run.start_step
    # A resumed (or restarted) run drops rows logged after its checkpoint: one row per step.
    writer = report.MetricsWriter(config.output_dir, run.total_steps,
                                  report_to=tuple(config.report_to), run_config=config,
                                  start_step=start)
    if jax.process_index() == 0:
        report.keep_rows_until(RunDir(config.output_dir).samples, start)
    arch, _ = models.arch_from_hf_config(run.meta["model"])
    flops_per_token, peak = utilisation_basis(run, arch)
    advisor = start_doctor(run)
    warn_schedule_change(run)
    health = health_lib.Health(run.checkpointer, arch.vocab_size,
                               advisor.divergence, start_step=start)

    def save(step) -> bool:
        if not health.may_save(step, run.state):
            return False
        run.checkpointer.save(step, run.state, {**run.meta, "advisor": advisor.state_dict(),
                                                "schedule": schedule(run)})
        health.saved_step(step)
        return True

    def evaluate(step, stop=None):
        metrics = eval_round(run, writer, step, stop)
        if metrics:
            health.observe_eval(step, metrics)
        return metrics

    if not run.data.eval.num_pairs:
        log.warning("No eval split (config.dataset_splits=%s has none with 'test' in its name, or "
                    "it is empty): training without evaluation.", list(config.dataset_splits))
    elif start == 0:
        evaluate(0)
    batches = run.batcher.batches(start)
    step_log = StepLog(run, writer, advisor, health, flops_per_token, peak)
    with batches:
        for step in range(start + 1, run.total_steps + 1):
            run.state, metrics = run.train_step(run.state, next(batches))
            step_log.flush()
            step_log.pending = (step, metrics)
            if step % config.save_steps == 0 or step % config.eval_steps == 0:
                step_log.flush()  # never checkpoint a step whose metrics were not checked
            if guard.should_stop(step):
                step_log.flush()
                return _stopped(run, writer, guard.signal_name, step, save(step))
            if step % config.eval_steps == 0 and step != run.total_steps:
                evaluate(step)  # before the save: a state whose eval is unhealthy is not saved
            if step % config.save_steps == 0 and step != run.total_steps:
                save(step)
        step_log.flush()
    return _finish(run, writer, save, evaluate, guard)


class StepLog:
    """Reads each step's metrics one step late (once the next is dispatched), checks, logs them."""

    def __init__(self, run: Run, writer: report.MetricsWriter, advisor: doctor.Advisor,
                 health: health_lib.Health, flops_per_token: float, peak: float):
        self.run, self.writer, self.advisor, self.health = run, writer, advisor, health
        self.flops_per_token, self.peak = flops_per_token, peak
        self.pending = None  # (step, metrics on device), not read yet
        self.last_time = time.time()

    def flush(self) -> None:
        """Reads, checks and logs the pending step's metrics, if any."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        now = time.time()
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        stepwise = dict(metrics)
        seconds = max(now - self.last_time, 1e-9)
        metrics["tokens_per_second"] = metrics.pop("num_tokens") / seconds
        metrics["pairs_per_second"] = metrics.pop("num_pairs") / seconds
        metrics["mfu"] = self.flops_per_token * metrics["tokens_per_second"] / self.peak
        self.last_time = now
        self.writer.progress(step, metrics)
        if step % self.run.config.logging_steps == 0 or step == self.run.total_steps:
            self.writer.write(step, metrics)
        self.health.observe(step, stepwise)  # after the row is written: it shows the signs
        if step % self.run.config.logging_steps == 0 or step == self.run.total_steps:
            for advice in self.advisor.observe(step, metrics):
                log.warning("doctor: %s", advice)


def _stopped(run: Run, writer: report.MetricsWriter, signal_name: str, step: int,
             saved: bool, during: str = "") -> dict:
    """After a signal: waits for the checkpoints being saved, says how to go on."""
    run.checkpointer.close()
    writer.close()
    where = f"{run.checkpointer.directory}/{step}"
    print(f"Stopped by {signal_name} {during or 'after step'} {step}/{run.total_steps}; "
          + (f"checkpoint saved in {where}. Rerun the same command to resume from it."
             if saved else "no checkpoint of this step (its metrics show signs of an unhealthy "
                           "run); a rerun resumes from the latest one."), flush=True)
    return {"preempted_at_step": step}


def _finish(run: Run, writer: report.MetricsWriter, save, evaluate, guard) -> dict:
    """The final checkpoint, eval, eval_results.json, plots, export and push; the final eval
    metrics. The checkpoint comes first, so a signal during the eval loses no step."""
    total = run.total_steps
    saved = save(total) if run.start_step < total else True
    final = _final_eval(run, writer, evaluate, guard)
    if final is None:
        return _stopped(run, writer, guard.signal_name, total, saved,
                        "during the final evaluation of step")
    run.checkpointer.close()
    if jax.process_index() == 0:
        report.write_eval_results(run.config.output_dir, final)
    writer.close()
    if jax.process_index() == 0:
        plots.plot_metrics(writer.path, run.config.output_dir)
    if guard.agree():
        return _stopped(run, writer, guard.signal_name, total, saved, "before the export of step")
    out_dir = export(run, eval_metrics=final, push=False)
    if run.config.push_to_hub:
        if guard.agree():
            return _stopped(run, writer, guard.signal_name, total, saved,
                            "before the push of step")
        if jax.process_index() == 0:
            publish.push_export(out_dir, run.config)
    return final


def _final_eval(run: Run, writer: report.MetricsWriter, evaluate, guard) -> dict | None:
    """The final eval's metrics; a rerun of a finished run reads them back instead of adding
    another row and more samples. None when a signal cut the eval short."""
    total = run.total_steps
    if not run.data.eval.num_pairs:
        return {}
    if run.start_step == total:
        done = read_eval_row(writer.path, total)
        if done is not None:
            log.info("The final eval of step %d is already in %s: not repeated.", total, writer.path)
            return done
        if jax.process_index() == 0 and total > 1:  # the samples of an eval cut short
            report.keep_rows_until(RunDir(run.config.output_dir).samples, total - 1)
    return evaluate(total, stop=guard.interrupted)


def export(run: Run, out_dir: str | None = None, eval_metrics: dict | None = None,
           push: bool | None = None) -> str:
    """Writes the current parameters as a Hugging Face folder with a model card; pushes if asked.

    LoRA: the folder holds the merged model (W + B A alpha/r) and out_dir/adapter a PEFT adapter.
    """
    config = run.config
    out_dir = out_dir or config.output_dir
    model = run.model(precision.master_value(run.state.params, run.state.opt_state,
                                             config.master_weights))
    if run.frozen is not None:
        lora_lib.save_adapter(model, os.path.join(out_dir, lora_lib.ADAPTER_DIR),
                              lora_lib.LoraConfig.from_config(config),
                              base_model_name_or_path=publish.base_model_name(
                                  config.model_name_or_path),
                              revision=config.revision, dtype=config.export_dtype)
        lora_lib.merge_adapters(model)
    models.save_pretrained(model, out_dir, tokenizer=run.tokenizer, dtype=config.export_dtype,
                           max_shard_size=config.max_shard_size)
    if jax.process_index() == 0:
        publish.write_model_card(out_dir, config, eval_metrics or report.read_eval_results(
            config.output_dir), run.global_batch)
        if config.push_to_hub if push is None else push:
            publish.push_export(out_dir, config)
    return out_dir


def export_checkpoint(config) -> str:
    """--mode=export: the latest checkpoint (or config.resume_from) as a Hugging Face folder.

    A run that stopped before its last step is exported with "step k of n" said, and pushed only
    with config.allow_partial_push."""
    run = build(config, with_data=False)
    try:
        run.checkpointer.close()
        if run.start_step == 0 and not config.resume_from:
            raise UserError(f"No checkpoint to export under {run.checkpointer.directory}; train "
                            "first or set config.resume_from to a checkpoint step folder.")
        total = (run.restored_meta or {}).get("total_steps") or run.start_step
        of = f"step {run.start_step} of {total}"
        if run.start_step < total:
            if config.push_to_hub and not config.allow_partial_push:
                raise UserError(f"--mode=export: the checkpoint is {of}: the run did not finish, "
                                "so it is not pushed. Finish it (the same command without --mode),"
                                " or set --config.allow_partial_push=True to push it anyway.")
            log.warning("Exporting %s: the run did not finish.", of)
        if not health_lib.state_is_finite(run.state):
            raise UserError(f"--mode=export: checkpoint {run.checkpointer.directory}/"
                            f"{run.start_step} holds values that are not finite; export an "
                            "earlier step with config.resume_from=<its folder>.")
        out_dir = export(run, config.export_dir or config.output_dir)
    finally:
        run_folder.release(config.output_dir)
    print(f"Exported {of} to {out_dir} ({config.export_dtype}).", flush=True)
    return out_dir
