"""Decoder-only language models (llama, mistral, qwen2, qwen3, gemma2, olmo2) in Flax NNX, with HF I/O.

    model = from_pretrained("path/to/hf_folder", mesh=mesh, dtype=jnp.bfloat16)
    logits_BTV = model(input_ids_BT, attention_mask_BT)
    save_pretrained(model, "out/", tokenizer=tokenizer, dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from simpo_jax import sharding as sharding_lib
from simpo_jax.models import families, hf
from simpo_jax.models import layers as layers_lib
from simpo_jax.models.decoder import REMAT_POLICIES, ArchConfig, CausalLM

__all__ = ["ArchConfig", "CausalLM", "REMAT_POLICIES", "from_config", "from_pretrained",
           "save_pretrained", "to_hf_tensors", "arch_from_hf_config"]


def arch_from_hf_config(hf_config: Any) -> tuple[ArchConfig, dict]:
    """(ArchConfig, config.json dict) of a transformers config or config.json dict."""
    config = families.normalize(hf_config)
    arch = families.arch_config(config)
    if arch.hidden_act not in layers_lib.ACTIVATIONS:
        raise ValueError(f"hidden_act={arch.hidden_act!r} is not supported; supported: "
                         f"{', '.join(layers_lib.ACTIVATIONS)}.")
    return arch, families.config_dict(config)


def _builder(hf_config, dtype, param_dtype, seed, remat_policy, attention):
    arch, config_dict = arch_from_hf_config(hf_config)
    layers_lib.select_attention(attention, arch.attn_softcap, dtype)  # a bad choice fails here
    arch = dataclasses.replace(arch, attention_impl=attention)
    return lambda: CausalLM(arch, config_dict, dtype=dtype, param_dtype=param_dtype, seed=seed,
                            remat_policy=remat_policy)


def from_config(hf_config: Any, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
                mesh: Mesh | None = None, remat_policy: str = "none",
                attention: str = "auto") -> CausalLM:
    """Randomly initialised model (normal(initializer_range) weights, HF norm init); into `mesh` shardings when given.

    attention: auto | xla | cudnn, see layers.select_attention.
    """
    build = _builder(hf_config, dtype, param_dtype, seed, remat_policy, attention)
    if mesh is None:
        return build()
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = sharding_lib.param_shardings(mesh, abstract)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def from_pretrained(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    mesh: Mesh | None = None, remat_policy: str = "none",
                    attention: str = "auto") -> CausalLM:
    """Loads a local HF folder (config.json + model.safetensors or a sharded index), tensor by tensor."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    build = _builder(config, dtype, param_dtype, 0, remat_policy, attention)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    else:
        shardings = sharding_lib.param_shardings(mesh, abstract)
    arch = nnx.merge(graphdef, abstract).arch
    state = hf.load_state(path, abstract, shardings, arch.num_layers, arch.tie_word_embeddings)
    return nnx.merge(graphdef, state)


def to_hf_tensors(graphdef_or_model, state=None) -> dict:
    """{HF key: host array} of a model, or of (graphdef, state) such as gradients."""
    if state is None:
        model = graphdef_or_model
        state = nnx.state(model, nnx.Param)
    else:
        model = nnx.merge(graphdef_or_model, state)
    return hf.to_hf_tensors(state, model.arch.num_layers)


def save_pretrained(model: CausalLM, out_dir: str, *, tokenizer=None, dtype=None,
                    max_shard_size="5GB") -> str:
    """Writes an HF folder: safetensors (sharded above max_shard_size), config.json, generation_config.json.

    Every process must call it (sharded parameters are gathered); only process 0 writes.
    dtype: None keeps the parameter dtype; jnp.bfloat16 / jnp.float32 or "bfloat16" / "float32".
    """
    import transformers

    state = nnx.state(model, nnx.Param)
    if dtype is not None:
        dtype = hf._numpy_dtype(jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype)
    write = jax.process_index() == 0
    if write:
        os.makedirs(out_dir, exist_ok=True)
    hf.save_state(state, out_dir, model.arch.num_layers, dtype=dtype, max_shard_size=max_shard_size)
    if write:
        config = families.normalize(model.hf_config_dict)
        config.architectures = [families.ARCHITECTURES[model.arch.model_type]]
        leaf_dtype = jax.tree_util.tree_leaves(state)[0].dtype
        config.dtype = str(jnp.dtype(dtype if dtype is not None else leaf_dtype).name)
        config.save_pretrained(out_dir)
        transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    return out_dir
