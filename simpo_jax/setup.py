"""The one setup of a model run, shared by train, eval, export, plan, generate and rm_eval.

From the config: the model spec (dtypes, remat, attention), the mesh, the tokenizer, the model
loaded into its shardings (or abstract: the planner, a checkpoint about to fill it), LoRA, the
optimizer, the abstract state and its shardings, and the jitted train and eval steps. The planner
calls these very functions on abstract inputs, so it compiles the step a run compiles.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from simpo_jax.data import pairs as pairs_lib, tokenize
from simpo_jax.hub import download
from simpo_jax import lora as lora_lib
from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import optim
from simpo_jax import precision
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib
from simpo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How the model is built: derived from the config once, read by every mode."""

    dtype: Any  # compute dtype
    param_dtype: Any  # the model's weights; a LoRA base is frozen, so held in the compute dtype
    master_dtype: Any  # what is trained: all weights, or LoRA's adapters
    remat_policy: str  # "none" unless gradient_checkpointing
    attention: str
    trust_remote_code: bool

    @classmethod
    def from_config(cls, config) -> "ModelSpec":
        dtype = jnp.bfloat16 if config.bf16 else jnp.float32
        master = precision.param_dtype(config.master_weights)
        return cls(dtype=dtype, param_dtype=dtype if config.lora_rank else master,
                   master_dtype=master,
                   remat_policy=config.remat_policy if config.gradient_checkpointing else "none",
                   attention=config.attention_implementation,
                   trust_remote_code=config.trust_remote_code)

    def model_kwargs(self) -> dict:
        """Keyword arguments of models.from_config / from_pretrained."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy,
                    attention=self.attention, trust_remote_code=self.trust_remote_code)


@dataclasses.dataclass
class Model:
    """A model split for training: graphdef, trained params, LoRA's frozen base (else None)."""

    graphdef: Any
    params: Any
    frozen: Any = None

    def module(self):
        """The nnx model of these parts (abstract parts: an abstract model)."""
        return nnx.merge(self.graphdef, self.params,
                         *(() if self.frozen is None else (self.frozen,)))


@dataclasses.dataclass(frozen=True)
class Steps:
    """The optimizer, the abstract train state with its shardings, and the jitted steps."""

    tx: Any
    schedule: Any
    abstract_state: step_lib.TrainState
    state_shardings: step_lib.TrainState
    frozen_shardings: Any
    train_step: Any  # (state, batch) -> (state, metrics); LoRA's frozen base bound
    eval_step: Any


def start(config):
    """Joins the processes of a multi-host run and returns the configured mesh."""
    sharding_lib.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
    return sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config))


def pretrained_paths(config) -> tuple[str, str]:
    """(model folder or "" for model_init, tokenizer folder): local paths, Hub ids downloaded."""
    model = tokenizer = ""
    if config.model_name_or_path:
        model = download.resolve_pretrained(config.model_name_or_path, revision=config.revision)
    if config.tokenizer_name_or_path and config.tokenizer_name_or_path != config.model_name_or_path:
        tokenizer = download.resolve_pretrained(config.tokenizer_name_or_path, revision=config.revision,
                                           weights=False, field="tokenizer_name_or_path")
    return model, tokenizer or model


def load_tokenizer(config):
    """(tokenizer, model folder or "" for model_init, the data config naming the tokenizer); the
    model is downloaded here when named on the Hub."""
    model_path, tokenizer_path = pretrained_paths(config)
    data_config = dataclasses.replace(pairs_lib.DataConfig.from_config(config),
                                      tokenizer_name_or_path=tokenizer_path)
    return tokenize.load_tokenizer(data_config), model_path, data_config


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


def add_lora(config, model, mesh):
    """Adapters (master dtype, seeded by config.seed) on the target projections, in place,
    sharded as their base weights; the base quantised when configured."""
    if model.arch.model_type in lora_lib.UNSUPPORTED_MODEL_TYPES:
        raise UserError(
            f"config.lora_rank={config.lora_rank}: LoRA is not supported for model_type "
            f"{model.arch.model_type!r} yet (its PEFT module names differ from ours); set "
            "lora_rank=0 for full fine-tuning.")
    lora_lib.add_adapters(model, lora_lib.LoraConfig.from_config(config), mesh=mesh,
                          seed=config.seed, param_dtype=ModelSpec.from_config(config).master_dtype)
    if config.lora_base_quantization == "int8":
        lora_lib.quantize_base(model, config.lora_target_modules, mesh=mesh)
    return model


def load_model(config, hf_config: dict, mesh, model_path: str, *, weights: bool,
               lora: bool = True) -> Model:
    """The model (with LoRA when configured and `lora`): loaded into its shardings, or abstract
    when `weights` is False (the planner; a checkpoint about to fill it)."""
    kwargs = ModelSpec.from_config(config).model_kwargs()
    with_lora = (lambda m: add_lora(config, m, mesh)) if config.lora_rank and lora else None
    if not weights:
        # source: the folder a multimodal checkpoint's untrained tensors are exported from.
        def abstract():
            model = models.from_config(hf_config, source=model_path, **kwargs)
            return with_lora(model) if with_lora else model
        model = nnx.eval_shape(abstract)
    else:
        if model_path:
            model = models.from_pretrained(model_path, mesh=mesh, **kwargs)
        else:
            model = models.from_config(hf_config, seed=config.model_init_seed, mesh=mesh, **kwargs)
        model = with_lora(model) if with_lora else model
    if with_lora:
        return Model(*lora_lib.split(model))
    return Model(*nnx.split(model, nnx.Param))


def make_steps(config, mesh, model: Model, *, total_steps: int, batch_layout: str,
               schedule=None) -> Steps:
    """The optimizer over total_steps and the train step of `batch_layout` (eval: padded)."""
    tx, schedule = optim.make_optimizer(optim.OptimConfig.from_config(config), total_steps,
                                        schedule)
    loss_cfg = loss_lib.LossConfig.from_config(config)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), model.params)
    frozen_sh = (None if model.frozen is None
                 else sharding_lib.param_shardings(mesh, model.frozen))
    common = dict(graphdef=model.graphdef, cfg=loss_cfg, frozen_shardings=frozen_sh,
                  logits_chunk_size=config.logits_chunk_size)
    train_step, state_sh = step_lib.jit_train_step(
        mesh, abstract_state, batch_layout=batch_layout,
        offload_optimizer_state=config.offload_optimizer_state, tx=tx, schedule=schedule,
        accumulation_steps=config.gradient_accumulation_steps, **common)
    eval_step = step_lib.jit_eval_step(mesh, state_sh.params, **common)
    if model.frozen is not None:
        train_step = step_lib.BoundFrozen(train_step, model.frozen)
        eval_step = step_lib.BoundFrozen(eval_step, model.frozen)
    if runs_pallas_kernel(config, mesh):
        train_step, eval_step = UnderMesh(train_step, mesh), UnderMesh(eval_step, mesh)
    return Steps(tx, schedule, abstract_state, state_sh, frozen_sh, train_step, eval_step)


def runs_pallas_kernel(config, mesh) -> bool:
    """Whether attention runs a Pallas kernel (splash on TPU, or splash / flash asked for)."""
    return (mesh.devices.flat[0].platform == "tpu"
            or config.attention_implementation in ("splash", "flash"))


class UnderMesh:
    """A jitted step traced and run under jax.set_mesh(mesh): the Pallas attention kernels run
    per device (shard_map) and need the mesh while tracing. `lower` as jit's."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)


def init_state(steps: Steps, params) -> step_lib.TrainState:
    """The train state of loaded params (optimizer moments zero), straight into its shardings."""
    return jax.jit(lambda p: step_lib.init_state(p, steps.tx),
                   out_shardings=steps.state_shardings)(params)
