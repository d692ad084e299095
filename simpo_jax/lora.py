"""LoRA: low-rank adapters on the decoder projections, a frozen base, PEFT adapters out.

Each targeted layers.Linear gets A [L, r, in] and B [L, out, r] as flax's nnx.LoRAParam (a
subclass of nnx.Param), stacked over layers like its weight and scanned with it; its output
becomes W x + (B A x) * alpha / r, as PEFT computes it. B starts at zero, so step 0 is the base.
`nnx.split(model, nnx.LoRAParam, nnx.Param)` separates what trains from what stays frozen:
the train state holds the adapters only, the base is a separate, never donated step argument.

Export: `merge_adapters` folds B A into W (the merged Hugging Face model); `save_adapter` writes
output_dir/adapter as PEFT does (adapter_config.json, adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in], `lora_B` [out, r]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors.numpy import save_file

from simpo_jax import sharding as sharding_lib
from simpo_jax.config.choices import LoraQuantization, LoraTarget
from simpo_jax.models import hf
from simpo_jax.models import layers as layers_lib

TARGET_MODULES = LoraTarget.values()
# Checkpoint layouts whose PEFT keys differ from our module paths: phi3 fuses q/k/v and gate/up
# (one adapter per fused tensor in PEFT), gemma3 nests the language model in a multimodal one.
UNSUPPORTED_MODEL_TYPES = ("phi3", "gemma3")
ADAPTER_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int  # 0 = full fine-tuning
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> "LoraConfig":
        return cls(int(config.lora_rank), float(config.lora_alpha), float(config.lora_dropout),
                   tuple(config.lora_target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def targets(model, target_modules) -> list[tuple[str, layers_lib.Linear]]:
    """(dot path, Linear) of the decoder-layer projections named in target_modules."""
    return [(".".join(map(str, path)), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, layers_lib.Linear) and tuple(path[:2]) == ("model", "layers")
            and path[-1] in target_modules]


def add_adapters(model, cfg: LoraConfig, *, mesh=None, seed: int = 0,
                 param_dtype=jnp.float32):
    """Gives the targeted Linears adapters, in place: A ~ PEFT's kaiming-uniform U(+-1/sqrt(in)),
    B = 0; on `mesh`, created straight into the sharding of the partition table."""
    found = targets(model, cfg.target_modules)
    if not found:
        raise ValueError(f"lora_target_modules={cfg.target_modules} matches no projection of the "
                         f"decoder layers; valid: {', '.join(TARGET_MODULES)}.")

    def init():
        key = jax.random.key(seed)
        out = []
        for n, (_, linear) in enumerate(found):
            *lead, fan_out, fan_in = linear.weight.shape
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(jax.random.fold_in(key, n), (*lead, cfg.rank, fan_in),
                                   param_dtype, -bound, bound)
            out.append((a, jnp.zeros((*lead, fan_out, cfg.rank), param_dtype)))
        return out

    if mesh is None:
        arrays = init()
    else:
        shapes = jax.eval_shape(init)
        shardings = [tuple(NamedSharding(mesh, sharding_lib.spec_for(f"{path}.{name}", x.shape,
                                                                     mesh))
                           for name, x in zip(("lora_A", "lora_B"), ab))
                     for (path, _), ab in zip(found, shapes)]
        arrays = jax.jit(init, out_shardings=shardings)()
    for (_, linear), (a, b) in zip(found, arrays):
        linear.lora_A, linear.lora_B = nnx.LoRAParam(a), nnx.LoRAParam(b)
        linear.lora_scale = cfg.scale
    return model


QUANTIZATIONS = LoraQuantization.values()


def quantize_base(model, target_modules, *, mesh=None):
    """Stores the targeted projections' frozen weights as int8, in place: per output row,
    scale = max|W| / 127 and W ~ round(W / scale) * scale (absmax, symmetric; 1 byte per weight
    plus 4 per row). One projection at a time, so the peak is the unquantised base plus one
    int8 projection. Only for a frozen LoRA base: the adapters stay in the master dtype."""
    for path, linear in targets(model, target_modules):
        def quantize(w):
            w = w.astype(jnp.float32)
            scale = jnp.maximum(jnp.max(jnp.abs(w), axis=-1, keepdims=True), 1e-12) / 127.0
            return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale

        w = linear.weight[...]
        if mesh is None:
            q, scale = jax.jit(quantize)(w)
        else:
            shardings = tuple(
                NamedSharding(mesh, sharding_lib.spec_for(f"{path}.{name}", shape, mesh))
                for name, shape in (("weight", w.shape), ("weight_scale", w.shape[:-1] + (1,))))
            q, scale = jax.jit(quantize, out_shardings=shardings)(w)
        linear.weight, linear.weight_scale = nnx.Param(q), nnx.Param(scale)
        del w
    return model


def split(model):
    """(graphdef, adapters, frozen base) of a model with adapters."""
    return nnx.split(model, nnx.LoRAParam, nnx.Param)


def merge_adapters(model):
    """Folds every adapter into its weight in place (W + B A alpha/r, float32) and drops it."""
    for _, linear in nnx.iter_graph(model):
        if not isinstance(linear, layers_lib.Linear) or linear.lora_A is None:
            continue
        delta = jnp.einsum("...or,...ri->...oi", linear.lora_B[...].astype(jnp.float32),
                           linear.lora_A[...].astype(jnp.float32))
        base = linear.weight[...].astype(jnp.float32)
        if linear.weight_scale is not None:  # an int8 base: the weights the adapters trained on
            base = base * linear.weight_scale[...].astype(jnp.float32)
            linear.weight_scale = None
        linear.weight = nnx.Param(base + delta * jnp.float32(linear.lora_scale))
        linear.lora_A = linear.lora_B = None
        linear.lora_scale = 0.0
    return model


def adapter_config(cfg: LoraConfig, base_model_name_or_path: str, revision: str = "") -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA (fields it and vLLM read)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None, "revision": revision or None,
        "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """{PEFT key: host array} of a model's adapters (every process must call it)."""
    num_layers = model.arch.num_layers
    out = {}
    for path, leaf in hf.param_leaves(nnx.state(model, nnx.LoRAParam)):
        module, name = path.rsplit(".", 1)  # model.layers.self_attn.q_proj, lora_A
        keys, transform, _ = hf.hf_keys(module + ".weight", num_layers)
        assert transform == "stack", path
        for i, key in enumerate(keys):
            out[f"base_model.model.{key[:-len('weight')]}{name}.weight"] = hf._host(leaf[i])
    return out


def save_adapter(model, out_dir: str, cfg: LoraConfig, *, base_model_name_or_path: str,
                 revision: str = "", dtype=None) -> str:
    """Writes a PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors."""
    tensors = adapter_tensors(model)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        np_dtype = hf._numpy_dtype(dtype) if dtype is not None else None
        save_file({k: np.ascontiguousarray(v if np_dtype is None else v.astype(np_dtype))
                   for k, v in tensors.items()},
                  os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
            json.dump(adapter_config(cfg, base_model_name_or_path, revision), f, indent=2,
                      sort_keys=True)
    return out_dir


def base_fingerprint(model_path: str, model_init_seed: int) -> str:
    """Identity of the frozen base the adapters were trained on, checked on resume: a SHA-256 of
    each weight file's name, size and 16 samples of 64 KiB spread through it (a fine-tune of the
    same architecture changes them), or the seed of a random initialisation."""
    if not model_path:
        return f"model_init_seed={model_init_seed}"
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors")):
        path = os.path.join(model_path, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()


def meta(config, model_path: str) -> dict | None:
    """The LoRA settings and base identity a checkpoint's adapters belong to; None: full FT."""
    if not config.lora_rank:
        return None
    cfg = LoraConfig.from_config(config)
    return {"rank": cfg.rank, "alpha": cfg.alpha, "target_modules": sorted(cfg.target_modules),
            "base": base_fingerprint(model_path, config.model_init_seed),
            "base_quantization": config.lora_base_quantization}
