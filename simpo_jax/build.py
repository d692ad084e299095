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
import jax.numpy as jnp
from flax import nnx

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax import config as config_lib
from simpo_jax.data import batcher as batcher_lib, pairs as pairs_lib, tokenize
from simpo_jax.data import report as data_report
from simpo_jax.hub import download, publish
from simpo_jax import lora as lora_lib
from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import optim
from simpo_jax import paths
from simpo_jax import precision
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
    batcher: batcher_lib.Batcher | None = None  # the training batches; None without data
    frozen: object = None  # LoRA: the frozen base's nnx.State (state.params holds the adapters)

    def model(self, params=None):
        """The model of `params` (default: the state's), with LoRA's frozen base."""
        params = self.state.params if params is None else params
        return nnx.merge(self.graphdef, params, *(() if self.frozen is None else (self.frozen,)))


def pretrained_paths(config) -> tuple[str, str]:
    """(model folder or "" for model_init, tokenizer folder): local paths, Hub ids downloaded."""
    model = tokenizer = ""
    if config.model_name_or_path:
        model = download.resolve_pretrained(config.model_name_or_path, revision=config.revision)
    if config.tokenizer_name_or_path and config.tokenizer_name_or_path != config.model_name_or_path:
        tokenizer = download.resolve_pretrained(config.tokenizer_name_or_path,
                                                revision=config.revision, weights=False,
                                                field="tokenizer_name_or_path")
    return model, tokenizer or model


def model_config(config, tokenizer, model_path: str) -> dict:
    """config.json fields of the model to train: the checkpoint's, or config.model_init's."""
    if model_path:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f)
    hf_config = config.model_init.to_dict()
    if hf_config["vocab_size"] < len(tokenizer):
        raise UserError(f"config.model_init.vocab_size={hf_config['vocab_size']} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_config[name] = getattr(tokenizer, name)
    return hf_config


def load_params(config, tokenizer, mesh, model_path: str, *, weights: bool):
    """(graphdef, params): loaded into their shardings, or abstract when a checkpoint will fill them."""
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    remat = config.remat_policy if config.gradient_checkpointing else "none"
    # A LoRA base is frozen: held in the compute dtype, never updated.
    kwargs = dict(dtype=dtype, param_dtype=dtype if config.lora_rank else
                  precision.param_dtype(config.master_weights),
                  remat_policy=remat, attention=config.attention_implementation,
                  trust_remote_code=config.trust_remote_code)
    hf_config = model_config(config, tokenizer, model_path)
    if not weights:
        # source: the folder a multimodal checkpoint's untrained tensors are exported from.
        model = nnx.eval_shape(lambda: models.from_config(hf_config, source=model_path, **kwargs))
    elif model_path:
        model = models.from_pretrained(model_path, mesh=mesh, **kwargs)
    else:
        model = models.from_config(hf_config, seed=config.model_init_seed, mesh=mesh, **kwargs)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


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


def build(config, *, with_data: bool = True, schedule=None) -> Run:
    """Mesh, tokenizer, data, model state (restored from a checkpoint when there is one), steps."""
    config = config_lib.validate(config)
    sharding_lib.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
    os.makedirs(config.output_dir, exist_ok=True)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config))
    dp = sharding_lib.data_parallel_size(mesh)
    global_batch = config.per_device_train_batch_size * dp * config.gradient_accumulation_steps
    eval_batch = config.per_device_eval_batch_size * dp
    if global_batch % jax.process_count() or eval_batch % jax.process_count():
        raise UserError(f"The global batch of {global_batch} pairs does not split over "
                         f"{jax.process_count()} processes.")
    if with_data:
        print(f"effective batch size: {global_batch} pairs = per_device_train_batch_size "
              f"{config.per_device_train_batch_size} x {dp} data-parallel devices (mesh "
              f"{dict(mesh.shape)}) x gradient_accumulation_steps "
              f"{config.gradient_accumulation_steps}", flush=True)

    # The Hub before any tokenisation (data sets before the model download), so a bad name costs
    # seconds, not minutes.
    if with_data:
        for name in config.dataset_mixer:
            if paths.resolve_local(name) is None and not paths.looks_local(name):
                download.check_dataset(name)
    model_path, tokenizer_path = pretrained_paths(config)
    if with_data and config.push_to_hub and jax.process_index() == 0:
        (log.info if config.hub_private_repo else log.warning)("%s", publish.upload_notice(config))
    data_config = dataclasses.replace(pairs_lib.DataConfig.from_config(config),
                                      tokenizer_name_or_path=tokenizer_path)
    tokenizer = tokenize.load_tokenizer(data_config)
    data, total_steps, batcher = None, 1, None
    if with_data:
        data = pairs_lib.build_datasets(data_config, tokenizer)
        if jax.process_index() == 0:
            data_report.write_report(data.report, config.output_dir)
        batcher = batcher_lib.make_batcher(config, mesh, data)
        if batcher.description:
            print(batcher.description, flush=True)
        steps_per_epoch = batcher.steps_per_epoch
        if steps_per_epoch < 1:
            raise UserError(f"The training split has {data.train.num_pairs} pairs, fewer than one "
                             f"global batch of {global_batch}.")
        total_steps = total_train_steps(config, steps_per_epoch)

    checkpointer = ckpt_lib.Checkpointer(os.path.join(config.output_dir, "checkpoints"),
                                         save_total_limit=config.save_total_limit)
    restoring = bool(checkpointer.steps() or config.resume_from)
    # LoRA: the base is always read from model_name_or_path; a checkpoint holds the adapters.
    graphdef, params = load_params(config, tokenizer, mesh, model_path,
                                   weights=not restoring or bool(config.lora_rank))
    frozen = frozen_sh = None
    if config.lora_rank:
        graphdef, params, frozen = add_lora(config, graphdef, params, mesh)
        frozen_sh = sharding_lib.param_shardings(mesh, frozen)
    tx, schedule = optim.make_optimizer(optim.OptimConfig.from_config(config), total_steps,
                                        schedule)
    loss_cfg = loss_lib.LossConfig.from_config(config)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    train_step, state_sh = step_lib.jit_train_step(
        mesh, abstract_state, batch_layout=batcher.layout if batcher else "padded",
        offload_optimizer_state=config.offload_optimizer_state, graphdef=graphdef, tx=tx, schedule=schedule, cfg=loss_cfg,
        accumulation_steps=config.gradient_accumulation_steps,
        logits_chunk_size=config.logits_chunk_size, frozen_shardings=frozen_sh)
    if restoring:
        state = ckpt_lib.abstract_with_shardings(abstract_state, state_sh)
    else:
        state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    del params
    eval_step = step_lib.jit_eval_step(mesh, state_sh.params, graphdef=graphdef, cfg=loss_cfg,
                                       logits_chunk_size=config.logits_chunk_size,
                                       frozen_shardings=frozen_sh)
    if frozen is not None:
        train_step = step_lib.BoundFrozen(train_step, frozen)
        eval_step = step_lib.BoundFrozen(eval_step, frozen)
    meta = {
        "model": json.loads(json.dumps(model_config(config, tokenizer, model_path), default=str)),
        "data_fingerprint": data.fingerprint if data else None,
        "global_batch": global_batch,
        "total_steps": total_steps,
        "seed": config.seed,
        "packing": batcher.meta if batcher else None,
        "memory": memory_mode(config),
        "lora": lora_lib.meta(config, model_path),
    }
    run = Run(config, mesh, tokenizer, data, graphdef, state, state_sh, train_step, eval_step,
              total_steps, global_batch, eval_batch, checkpointer, meta, batcher=batcher,
              frozen=frozen)
    run.start_step = resume(run, check=("model", "data_fingerprint", "global_batch", "seed", "packing",
                                   "memory", "lora") if with_data else ("model", "memory", "lora")
                            ) if restoring else 0
    return run


def add_lora(config, graphdef, params, mesh):
    """(graphdef, adapters, frozen base): adapters (master dtype, seeded by config.seed) added to
    the loaded model's target projections, sharded as their base weights."""
    model = nnx.merge(graphdef, params)
    if model.arch.model_type in lora_lib.UNSUPPORTED_MODEL_TYPES:
        raise UserError(
            f"config.lora_rank={config.lora_rank}: LoRA is not supported for model_type "
            f"{model.arch.model_type!r} yet (its PEFT module names differ from ours); set "
            "lora_rank=0 for full fine-tuning.")
    lora_lib.add_adapters(model, lora_lib.LoraConfig.from_config(config), mesh=mesh,
                          seed=config.seed,
                          param_dtype=precision.param_dtype(config.master_weights))
    if config.lora_base_quantization == "int8":
        lora_lib.quantize_base(model, config.lora_target_modules, mesh=mesh)
    return lora_lib.split(model)


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
