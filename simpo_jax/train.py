"""The training loop and the modes around it: train, export."""

from __future__ import annotations

import logging
import math
import os
import time

import jax

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax import doctor
from simpo_jax import flops
from simpo_jax import lora as lora_lib
from simpo_jax import models
from simpo_jax import plots
from simpo_jax import precision
from simpo_jax import report
from simpo_jax.build import Run, build
from simpo_jax.evaluation import eval_round
from simpo_jax.errors import UserError
from simpo_jax.hub import publish
from simpo_jax.paths import RunDir

log = logging.getLogger(__name__)


def check_finite(step: int, metrics: dict, advisor: doctor.Advisor) -> None:
    if not all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm")):
        raise FloatingPointError(advisor.nan_message(step, metrics))


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


def utilisation_basis(run: Run) -> tuple[float, float]:
    """(model FLOPs per trained token, peak FLOP/s of the whole mesh) for the `mfu` metric."""
    arch, _ = models.arch_from_hf_config(run.meta["model"])
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
    """Trains per `config`; returns the final eval metrics. Output contract in the README."""
    run = build(config)
    try:
        return _train(run)
    finally:  # an error still completes the checkpoints already being written
        run.checkpointer.close()


def _train(run: Run) -> dict:
    config, start = run.config, run.start_step
    # A resumed (or restarted) run drops rows logged after its checkpoint: one row per step.
    writer = report.MetricsWriter(config.output_dir, run.total_steps,
                                  report_to=tuple(config.report_to), run_config=config,
                                  start_step=start)
    if jax.process_index() == 0:
        report.keep_rows_until(RunDir(config.output_dir).samples, start)
    flops_per_token, peak = utilisation_basis(run)
    advisor = start_doctor(run)

    def save(step):
        run.checkpointer.save(step, run.state, {**run.meta, "advisor": advisor.state_dict()})

    if not run.data.eval.num_pairs:
        log.warning("No eval split (config.dataset_splits=%s has none with 'test' in its name, or "
                    "it is empty): training without evaluation.", list(config.dataset_splits))
    elif start == 0:
        eval_round(run, writer, 0)
    batches = run.batcher.batches(start)
    step_log = StepLog(run, writer, advisor, flops_per_token, peak)
    with ckpt_lib.PreemptionGuard() as guard, batches:
        for step in range(start + 1, run.total_steps + 1):
            run.state, metrics = run.train_step(run.state, next(batches))
            step_log.flush()
            step_log.pending = (step, metrics)
            if step % config.save_steps == 0 or step % config.eval_steps == 0:
                step_log.flush()  # never checkpoint a step whose metrics were not checked
            if guard.should_stop(step):
                step_log.flush()
                save(step)
                return _stopped(run, writer, guard.signal_name, step)
            if step % config.save_steps == 0 and step != run.total_steps:
                save(step)
            if step % config.eval_steps == 0 and step != run.total_steps:
                eval_round(run, writer, step)
        step_log.flush()
    return _finish(run, writer, save)


class StepLog:
    """Reads each step's metrics one step late (once the next is dispatched), checks, logs them."""

    def __init__(self, run: Run, writer: report.MetricsWriter, advisor: doctor.Advisor,
                 flops_per_token: float, peak: float):
        self.run, self.writer, self.advisor = run, writer, advisor
        self.flops_per_token, self.peak = flops_per_token, peak
        self.pending = None  # (step, metrics on device), not read yet
        self.last_time = time.time()

    def flush(self) -> None:
        """Reads, checks and logs the pending step's metrics, if any."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        metrics = jax.device_get(metrics)
        check_finite(step, metrics, self.advisor)
        now = time.time()
        metrics = {k: float(v) for k, v in metrics.items()}
        seconds = max(now - self.last_time, 1e-9)
        metrics["tokens_per_second"] = metrics.pop("num_tokens") / seconds
        metrics["pairs_per_second"] = metrics.pop("num_pairs") / seconds
        metrics["mfu"] = self.flops_per_token * metrics["tokens_per_second"] / self.peak
        self.last_time = now
        self.writer.progress(step, metrics)
        if step % self.run.config.logging_steps == 0 or step == self.run.total_steps:
            self.writer.write(step, metrics)
            for advice in self.advisor.observe(step, metrics):
                log.warning("doctor: %s", advice)


def _stopped(run: Run, writer: report.MetricsWriter, signal_name: str, step: int) -> dict:
    """After a signal: waits for the checkpoint of `step` to be saved, says how to go on."""
    run.checkpointer.close()
    writer.close()
    print(f"Stopped by {signal_name} after step {step}/{run.total_steps}; "
          f"checkpoint saved in {run.checkpointer.directory}/{step}. Rerun the same "
          "command to resume from it.", flush=True)
    return {"preempted_at_step": step}


def _finish(run: Run, writer: report.MetricsWriter, save) -> dict:
    """The final eval, checkpoint, eval_results.json, plots and export; the final eval metrics."""
    final = eval_round(run, writer, run.total_steps)
    if run.start_step < run.total_steps:
        save(run.total_steps)
    run.checkpointer.close()
    if jax.process_index() == 0:
        report.write_eval_results(run.config.output_dir, final)
    writer.close()
    if jax.process_index() == 0:
        plots.plot_metrics(writer.path, run.config.output_dir)
    export(run, eval_metrics=final)
    return final


def export(run: Run, out_dir: str | None = None, eval_metrics: dict | None = None) -> str:
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
        if config.push_to_hub:
            publish.push_export(out_dir, config)
    return out_dir


def export_checkpoint(config) -> str:
    """--mode=export: the latest checkpoint (or config.resume_from) as a Hugging Face folder."""
    run = build(config, with_data=False)
    if run.start_step == 0 and not config.resume_from:
        raise UserError(f"No checkpoint to export under {run.checkpointer.directory}; train first "
                         "or set config.resume_from to a checkpoint step folder.")
    run.checkpointer.close()
    out_dir = export(run, config.export_dir or config.output_dir)
    print(f"Exported step {run.start_step} to {out_dir} ({config.export_dtype}).", flush=True)
    return out_dir
