"""Everything a run needs, built from a config: mesh, tokenizer, data, sharded state, steps.

Also the resume logic (the latest complete checkpoint, checked against this run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
from flax import nnx

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax import config as config_lib
from simpo_jax.data import batcher as batcher_lib, pairs as pairs_lib
from simpo_jax.data import report as data_report
from simpo_jax.hub import download, publish
from simpo_jax import lora as lora_lib
from simpo_jax import paths
from simpo_jax import run_folder
from simpo_jax import setup
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib
from simpo_jax.errors import UserError

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
    restored_meta: dict | None = None  # the meta saved with the checkpoint resumed from
    batcher: object = None  # the training batches (data.batcher.Batcher); None without data
    frozen: object = None  # LoRA: the frozen base's nnx.State (state.params holds the adapters)

    def model(self, params=None):
        """The model of `params` (default: the state's), with LoRA's frozen base."""
        params = self.state.params if params is None else params
        return nnx.merge(self.graphdef, params, *(() if self.frozen is None else (self.frozen,)))


def memory_mode(config) -> dict:
    """What a checkpoint's state holds: the dtypes of master weights and moments (not offload)."""
    return {"master_weights": config.master_weights,
            "optimizer_state_dtype": config.optimizer_state_dtype}


# Checkpoint meta fields added after checkpoints existed: their value in those older checkpoints.
META_DEFAULTS = {"memory": {"master_weights": "float32", "optimizer_state_dtype": "float32"},
                 "lora": None}


def total_train_steps(config, steps_per_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * steps_per_epoch))


# What a resumed checkpoint must share with this run (without data: the model's own fields).
RESUME_CHECKS = ("model", "data_fingerprint", "global_batch", "seed", "packing", "memory", "lora")
MODEL_CHECKS = ("model", "memory", "lora")


def build(config, *, with_data: bool = True, schedule=None, fresh: bool = False,
          checks: tuple[str, ...] | None = None) -> Run:
    """Mesh, tokenizer, data, model state (restored from a checkpoint when there is one), steps.

    Takes output_dir's lock (run_folder; the caller releases it); `fresh` (training) honours
    config.overwrite_output_dir. `checks`: the meta fields a restored checkpoint must share with
    this run (RESUME_CHECKS to train on, MODEL_CHECKS without data, by default)."""
    config = config_lib.validate(config)
    mesh = setup.start(config)
    os.makedirs(config.output_dir, exist_ok=True)
    run_folder.claim(config, fresh=fresh)
    global_batch, eval_batch = batch_sizes(config, mesh, say=with_data)
    if with_data:
        check_hub_datasets(config)
    tokenizer, model_path, data_config = setup.load_tokenizer(config)
    if with_data and config.push_to_hub and jax.process_index() == 0:
        (log.info if config.hub_private_repo else log.warning)("%s", publish.upload_notice(config))
    data, total_steps, batcher = None, 1, None
    if with_data:
        data, total_steps, batcher = train_data(config, data_config, tokenizer, mesh, global_batch)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(config.output_dir, "checkpoints"),
                                         save_total_limit=config.save_total_limit)
    restoring = bool(checkpointer.steps() or config.resume_from)
    hf_config = setup.model_config(config, tokenizer, model_path)
    # LoRA: the base is always read from model_name_or_path; a checkpoint holds the adapters.
    model = setup.load_model(config, hf_config, mesh, model_path,
                             weights=not restoring or bool(config.lora_rank))
    steps = setup.make_steps(config, mesh, model, total_steps=total_steps,
                             batch_layout=batcher.layout if batcher else "padded", schedule=schedule)
    state = (ckpt_lib.abstract_with_shardings(steps.abstract_state, steps.state_shardings)
             if restoring else setup.init_state(steps, model.params))
    meta = {"model": json.loads(json.dumps(hf_config, default=str)),
            "data_fingerprint": data.fingerprint if data else None, "global_batch": global_batch,
            "total_steps": total_steps, "seed": config.seed, "packing": batcher.meta if batcher else None,
            "memory": memory_mode(config), "lora": lora_lib.meta(config, model_path)}
    run = Run(config, mesh, tokenizer, data, model.graphdef, state, steps.state_shardings,
              steps.train_step, steps.eval_step, total_steps, global_batch, eval_batch,
              checkpointer, meta, batcher=batcher, frozen=model.frozen)
    if restoring:
        if checks is None:
            checks = RESUME_CHECKS if with_data else MODEL_CHECKS
        run.start_step = resume(run, check=checks)
    return run


def batch_sizes(config, mesh, *, say: bool) -> tuple[int, int]:
    """(global train batch, eval batch) in pairs, checked to split over the processes."""
    dp = sharding_lib.data_parallel_size(mesh)
    global_batch = config.per_device_train_batch_size * dp * config.gradient_accumulation_steps
    eval_batch = config.per_device_eval_batch_size * dp
    if global_batch % jax.process_count() or eval_batch % jax.process_count():
        raise UserError(f"The global batch of {global_batch} pairs does not split over "
                         f"{jax.process_count()} processes.")
    if say:
        print(f"effective batch size: {global_batch} pairs = per_device_train_batch_size "
              f"{config.per_device_train_batch_size} x {dp} data-parallel devices (mesh "
              f"{dict(mesh.shape)}) x gradient_accumulation_steps "
              f"{config.gradient_accumulation_steps}", flush=True)
    return global_batch, eval_batch


def check_hub_datasets(config) -> None:
    """The Hub before any tokenisation (data sets before the model download), so a bad name costs
    seconds, not minutes."""
    for name in config.dataset_mixer:
        if paths.resolve_local(name) is None and not paths.looks_local(name):
            download.check_dataset(name)


def train_data(config, data_config, tokenizer, mesh, global_batch: int):
    """(data, total steps, batcher): the tokenised splits, the run's length, its batches."""
    data = pairs_lib.build_datasets(data_config, tokenizer)
    if jax.process_index() == 0:
        data_report.write_report(data.report, config.output_dir)
    batcher = batcher_lib.make_batcher(config, mesh, data)
    if batcher.description:
        print(batcher.description, flush=True)
    if batcher.steps_per_epoch < 1:
        raise UserError(f"The training split has {data.train.num_pairs} pairs, fewer than one "
                         f"global batch of {global_batch}.")
    return data, total_train_steps(config, batcher.steps_per_epoch), batcher


def resume(run: Run, check: tuple[str, ...]) -> int:
    """Restores the latest complete checkpoint (or config.resume_from); returns the start step."""
    config = run.config
    checkpointer, step = run.checkpointer, None
    if config.resume_from:
        path = paths.resolve_local(config.resume_from) or os.path.abspath(config.resume_from)
        checkpointer = ckpt_lib.Checkpointer(os.path.dirname(path), save_total_limit=0)
        step = int(os.path.basename(path))

    def same_run(step, meta):
        for key in check:
            if meta.get(key, META_DEFAULTS.get(key)) != run.meta[key]:
                if key == "memory":
                    raise UserError(
                        f"Checkpoint {checkpointer.directory}/{step} holds a state of "
                        f"{_short(meta.get(key, META_DEFAULTS[key]))} but this run asks for "
                        f"{_short(run.meta[key])}: the optimizer moments and master weights are "
                        "stored in those dtypes and cannot be converted on resume. Resume with "
                        "the checkpoint's settings, or start a new output_dir (from an exported "
                        "model) to change them.")
                raise UserError(
                    f"Checkpoint {checkpointer.directory}/{step} was written with a different "
                    f"{key}: {_short(meta.get(key))} there, {_short(run.meta[key])} now. Use a new "
                    "output_dir, or restore the settings of that run.")

    restored = checkpointer.restore(run.state, step, check=same_run)
    if restored is None:
        return 0
    step, state, meta = restored
    run.state, run.restored_meta = state, meta
    print(f"Resumed from {checkpointer.directory}/{step}.", flush=True)
    return step


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 300 else text[:300] + "..."
