"""Decoder-only language models (llama, mistral, qwen2, qwen3, gemma2, gemma3, olmo2, phi3) in
Flax NNX, with HF I/O; of a multimodal checkpoint (gemma3), the language model.

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


def arch_from_hf_config(hf_config: Any, trust_remote_code: bool = False
                        ) -> tuple[ArchConfig, dict]:
    """(ArchConfig, config.json dict) of a transformers config or config.json dict.

    A multimodal config.json dict is kept as it came: export writes it back unchanged.
    """
    config = families.normalize(hf_config, trust_remote_code)
    arch = families.arch_config(config)
    if arch.hidden_act not in layers_lib.ACTIVATIONS:
        raise ValueError(f"hidden_act={arch.hidden_act!r} is not supported; supported: "
                         f"{', '.join(layers_lib.ACTIVATIONS)}.")
    if isinstance(hf_config, dict) and arch.model_type in families.MULTIMODAL:
        return arch, dict(hf_config)
    return arch, families.config_dict(config)


def _builder(hf_config, dtype, param_dtype, seed, remat_policy, attention, source="",
             trust_remote_code=False):
    arch, config_dict = arch_from_hf_config(hf_config, trust_remote_code)
    layers_lib.select_attention(attention, arch.attn_softcap, dtype)  # a bad choice fails here
    arch = dataclasses.replace(arch, attention_impl=attention)
    return lambda: CausalLM(arch, config_dict, dtype=dtype, param_dtype=param_dtype, seed=seed,
                            remat_policy=remat_policy, source=source)


def from_config(hf_config: Any, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
                mesh: Mesh | None = None, remat_policy: str = "none",
                attention: str = "auto", source: str = "",
                trust_remote_code: bool = False) -> CausalLM:
    """Randomly initialised model (normal(initializer_range) weights, HF norm init); into `mesh` shardings when given.

    attention: auto | xla | cudnn, see layers.select_attention. source: the checkpoint folder the
    weights will come from (a restored training checkpoint of a multimodal model exports the
    other towers from there). trust_remote_code only changes why a checkpoint needing its own code
    is refused (families.normalize): no checkpoint code ever runs.
    """
    build = _builder(hf_config, dtype, param_dtype, seed, remat_policy, attention,
                     os.path.abspath(source) if source else "", trust_remote_code)
    if mesh is None:
        return build()
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = sharding_lib.param_shardings(mesh, abstract)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def from_pretrained(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    mesh: Mesh | None = None, remat_policy: str = "none",
                    attention: str = "auto", trust_remote_code: bool = False) -> CausalLM:
    """Loads a local HF folder (config.json + model.safetensors or a sharded index), tensor by tensor."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    build = _builder(config, dtype, param_dtype, 0, remat_policy, attention, os.path.abspath(path),
                     trust_remote_code)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = sharding_lib.placement(mesh, abstract)
    arch = nnx.merge(graphdef, abstract).arch
    state = hf.load_state(path, abstract, shardings, arch.num_layers, arch.tie_word_embeddings,
                          arch.model_type)
    return nnx.merge(graphdef, state)


def to_hf_tensors(graphdef_or_model, state=None) -> dict:
    """{HF key: host array} of a model, or of (graphdef, state) such as gradients."""
    if state is None:
        model = graphdef_or_model
        state = nnx.state(model, nnx.Param)
    else:
        model = nnx.merge(graphdef_or_model, state)
    return hf.to_hf_tensors(state, model.arch.num_layers, _layout(model))


def _layout(model: CausalLM) -> hf.KeyLayout:
    keys = ()
    if model.arch.model_type in families.MULTIMODAL and model.source:
        keys = hf._Checkpoint(model.source).files
    return hf.key_layout(model.arch.model_type, keys)


def save_pretrained(model: CausalLM, out_dir: str, *, tokenizer=None, dtype=None,
                    max_shard_size="5GB") -> str:
    """Writes an HF folder: safetensors (sharded above max_shard_size), config.json, generation_config.json.

    Every process must call it (sharded parameters are gathered); only process 0 writes.
    dtype: None keeps the parameter dtype; jnp.bfloat16 / jnp.float32 or "bfloat16" / "float32".
    A multimodal model (gemma3): the tensors we do not train are copied from the checkpoint it
    was loaded from (model.source) unchanged, under the same keys, and config.json is that
    checkpoint's with only its dtype changed, so the folder loads as the class it came from.
    """
    import transformers

    multimodal = model.arch.model_type in families.MULTIMODAL
    if multimodal and not (model.source and os.path.isdir(model.source)):
        raise ValueError(
            f"Exporting a {families.ARCHITECTURES[model.arch.model_type]} needs the checkpoint it "
            f"was loaded from (source={model.source!r}) for the tensors we do not train (vision "
            "tower, projector); load it with models.from_pretrained(path) or pass "
            "models.from_config(..., source=path).")
    if multimodal and os.path.abspath(out_dir) == model.source:
        raise ValueError(f"Export to {out_dir} would overwrite the checkpoint it copies the "
                         "vision tower from; choose another folder.")
    state = nnx.state(model, nnx.Param)
    if dtype is not None:
        dtype = hf._numpy_dtype(jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype)
    write = jax.process_index() == 0
    if write:
        os.makedirs(out_dir, exist_ok=True)
    hf.save_state(state, out_dir, model.arch.num_layers, dtype=dtype, max_shard_size=max_shard_size,
                  layout=_layout(model), carry_from=model.source if multimodal else None)
    leaf_dtype = jax.tree_util.tree_leaves(state)[0].dtype
    dtype_name = str(jnp.dtype(dtype if dtype is not None else leaf_dtype).name)
    if write and multimodal:
        config = model.hf_config_dict
        config["torch_dtype" if "torch_dtype" in config and "dtype" not in config
               else "dtype"] = dtype_name
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        transformers.GenerationConfig.from_model_config(
            families.normalize(config)).save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    elif write:
        config = families.normalize(model.hf_config_dict)
        config.architectures = [families.ARCHITECTURES[model.arch.model_type]]
        config.dtype = dtype_name
        config.save_pretrained(out_dir)
        transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    return out_dir
