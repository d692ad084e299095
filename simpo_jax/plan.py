"""--mode=plan: per-device memory and FLOPs of the full train step, compiled ahead of time.

No weights are allocated: the model, optimizer state and batch are abstract shapes with their real
shardings; the step is lowered and compiled for a named target and XLA's memory analysis is read.
TPU targets use the real TPU compiler on this host (libtpu, `topologies.get_topology_desc`), no
chips needed. GPU targets cannot be compiled without a CUDA plugin, so they are an *estimate*: the
same program compiled for 8 simulated CPU devices (a child Python with
XLA_FLAGS=--xla_force_host_platform_device_count=8 when this one has fewer) next to an analytic
count; the larger of the two decides `fits`. A TPU program over the chip's memory is refused by
the compiler, which states the temporaries it needed: those rows read "compiled (out of memory)".

    python run.py --config=configs/mistral7b.py --mode=plan --config.plan_target=tpu-v5e-8
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax import flops
from simpo_jax import paths
from simpo_jax import setup
from simpo_jax import sharding as sharding_lib
from simpo_jax.data.batcher import make_batcher
from simpo_jax.errors import UserError
from simpo_jax.plan_report import GIB, format_row, format_table, next_steps
from simpo_jax.plan_search import candidates, overrides, setting_of, with_setting
from simpo_jax.plan_targets import (TARGETS, Target, capacity_per_device, target_devices,
                                    uses_tpu_compiler)


ASSETS = os.path.join(paths.ASSETS, "model_configs")


def hf_config_of(config) -> dict:
    """config.json of the model: a local folder's, a Hub name's shipped copy, or model_init."""

    name = config.model_name_or_path
    if name:
        path = paths.resolve_local(name) or name
        if os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                return json.load(f)
        shipped = os.path.join(ASSETS, name.replace("/", "__") + ".json")
        if os.path.isfile(shipped):
            with open(shipped) as f:
                return json.load(f)
        raise UserError(
            f"model_name_or_path={name!r}: no config.json there and no shipped copy "
            f"{shipped}; point it at a local folder, or use one of "
            f"{sorted(f[:-5].replace('__', '/') for f in os.listdir(ASSETS))}.")
    return config.model_init.to_dict()


def _sharded_bytes(tree, shardings) -> int:
    """Exact bytes one device holds of a tree of abstract arrays under their shardings."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return total


def activation_estimate(arch, *, pairs: int, length: int, remat: str, dtype_bytes: int,
                        tensor: int, logits_chunk_size: int) -> int:
    """Analytic per-device activation bytes of one micro-batch's backward pass (upper-bound style).

    Saved per layer: the block input (full remat), plus matmul outputs (dots policies), or every
    intermediate including f32 attention probabilities (no remat); one layer is live in full while
    it is recomputed; the f32 logits (and their gradient) unless chunked.
    """
    n = pairs * 2 * length  # tokens on one data-parallel device
    h, i, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    dots = n * (q + 2 * kv + h + 3 * i) * dtype_bytes // tensor
    scores = pairs * 2 * arch.num_heads * length * length * 4 // tensor
    full_layer = n * 4 * h * dtype_bytes + dots + 2 * scores
    saved = {"none": full_layer, "dots": n * h * dtype_bytes + dots,
             "dots_saveable": n * h * dtype_bytes + dots, "full": n * h * dtype_bytes}[remat]
    logits = n * arch.vocab_size * 4 * 2 // tensor
    if logits_chunk_size:
        logits = pairs * 2 * logits_chunk_size * arch.vocab_size * 4 * 2 // tensor
    return arch.num_layers * saved + full_layer + logits


# The schedule's length when config.max_steps does not give one: the planner reads no data, and
# the length moves neither memory nor FLOPs (only the schedule's constants).
PLAN_TOTAL_STEPS = 1000


def abstract_step(config, hf_config: dict, mesh) -> tuple[setup.Model, setup.Steps, object]:
    """(model, steps, state) of the run's own setup with no weights: the state abstract, with its
    shardings, ready to lower steps.train_step against abstract_batch()."""
    model = setup.load_model(config, hf_config, mesh, "", weights=False)
    total_steps = config.max_steps if config.max_steps > 0 else PLAN_TOTAL_STEPS
    steps = setup.make_steps(config, mesh, model, total_steps=total_steps,
                             batch_layout=config.batch_layout)
    state = ckpt_lib.abstract_with_shardings(steps.abstract_state, steps.state_shardings)
    return model, steps, state


def compile_step(config, hf_config: dict, devices):
    """Lowers and compiles the train step the config would run, on abstract inputs.

    The configured batch layout, remat policy, logits chunks, memory modes and offloading, on
    the configured mesh: the per-device figures.
    """
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config), devices)
    model, steps, state = abstract_step(config, hf_config, mesh)
    batch, pairs, tokens = make_batcher(config, mesh).abstract_batch()
    result = figures(config, mesh, model, steps, batch, pairs, tokens)
    return compiled_figures(steps.train_step.lower(state, batch), result)


def figures(config, mesh, model: setup.Model, steps: setup.Steps, batch: dict, pairs: int,
            tokens: int) -> dict:
    """What the plan knows before compiling: sharded bytes, FLOPs, the analytic activations."""
    spec = setup.ModelSpec.from_config(config)
    state_sh = steps.state_shardings
    params_b = _sharded_bytes(steps.abstract_state.params, state_sh.params)
    frozen_b = 0 if model.frozen is None else _sharded_bytes(model.frozen, steps.frozen_shardings)
    opt_b = _sharded_bytes(steps.abstract_state.opt_state, state_sh.opt_state)
    host_b = opt_b if config.offload_optimizer_state else 0
    arch = model.module().arch
    t = config.max_length if config.batch_layout == "padded" else batch.input_ids.shape[1]
    per_device_rows = batch.input_ids.shape[0] // (sharding_lib.data_parallel_size(mesh)
                                                      * config.gradient_accumulation_steps)
    return {
        "setting": setting_of(config), "batch_layout": config.batch_layout,
        "remat_policy": spec.remat_policy, "mesh": dict(mesh.shape),
        "logits_chunk_size": config.logits_chunk_size,
        "num_devices": mesh.devices.size, "global_batch_pairs": pairs,
        "micro_batch_pairs_per_device": config.per_device_train_batch_size,
        "accumulation_steps": config.gradient_accumulation_steps, "max_length": config.max_length,
        "row_length": t, "rows_per_device": per_device_rows,
        "num_params": sum(x.size for x in jax.tree.leaves(model.params)),
        "params_bytes": params_b, "opt_state_bytes": opt_b - host_b, "host_bytes": host_b,
        "frozen_bytes": frozen_b,  # LoRA: the frozen base (params_bytes: the adapters)
        "batch_bytes": _sharded_bytes(batch, jax.tree.map(lambda x: x.sharding, batch)),
        "model_flops_per_step": flops.model_flops(arch, tokens, t),  # PaLM convention
        "activation_estimate_bytes": activation_estimate(
            arch, pairs=per_device_rows if config.batch_layout == "padded" else per_device_rows / 2,
            length=t, remat=spec.remat_policy, dtype_bytes=jnp.dtype(spec.dtype).itemsize,
            tensor=mesh.shape["tensor"], logits_chunk_size=config.logits_chunk_size),
    }


def compiled_figures(lowered, result: dict) -> dict:
    """Adds the compiler's memory analysis and FLOPs (or, refused, the temporaries it needed)."""
    fixed = result["params_bytes"] + result["frozen_bytes"] + result["opt_state_bytes"]
    start = time.time()
    try:
        compiled = lowered.compile()
    except Exception as e:
        # The TPU compiler refuses a program over the chip's memory and says by how much.
        found = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", str(e))
        if not found:
            raise
        temp = float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " ")
        result.update(compile_seconds=round(time.time() - start, 1), out_of_memory=True,
                      temp_bytes=int(temp), total_bytes=int(fixed + temp),
                      xla_flops_per_device=None, compile_error=str(e).splitlines()[0][:300])
        return result
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    result.update(
        compile_seconds=round(time.time() - start, 1), out_of_memory=False,
        temp_bytes=mem.temp_size_in_bytes,  # gradients, accumulators, activations, workspace
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
        host_argument_bytes=getattr(mem, "host_argument_size_in_bytes", 0),
        host_temp_bytes=getattr(mem, "host_temp_size_in_bytes", 0),
        total_bytes=total,
        # XLA counts a loop body once (layer scan, accumulation scan): a lower bound.
        xla_flops_per_device=float(cost.get("flops", -1.0)))
    return result


def verdict(result: dict, target: Target, capacity_bytes: int) -> dict:
    """Adds capacity, needed bytes and `fits` to a compile_step result."""
    result["capacity_bytes"] = capacity_bytes
    if target.platform == "tpu":
        result["kind"] = "compiled (out of memory)" if result["out_of_memory"] else "compiled"
        needed = result["total_bytes"]
    elif result.get("compiler") == "tpu":
        result["kind"] = "estimate (TPU compiler" + (", out of memory)" if result["out_of_memory"]
                                                      else ")")
        needed = result["total_bytes"]
    else:
        # Params, optimizer, gradients (and an accumulator) in the parameters' dtype are exact;
        # activations analytic.
        grads = 2 if result["accumulation_steps"] > 1 else 1
        result["analytic_total_bytes"] = ((1 + grads) * result["params_bytes"]
                                          + result["opt_state_bytes"]
                                          + result["activation_estimate_bytes"])
        result["kind"] = "estimate"
        needed = max(result["total_bytes"], result["analytic_total_bytes"])
    result["needed_bytes"] = needed
    result["fits"] = bool(needed <= capacity_bytes and not result["out_of_memory"])
    return result


def plan(config) -> dict:
    """Plans the train step on config.plan_target; prints a table, writes <output_dir>/plan.json."""
    if config.plan_target not in TARGETS:
        raise UserError(f"plan_target={config.plan_target!r}: must be one of {sorted(TARGETS)}.")
    target = TARGETS[config.plan_target]
    hf_config = hf_config_of(config)
    tpu_compiler = uses_tpu_compiler(target, config)
    if not tpu_compiler and len(jax.devices("cpu")) < target.num_chips:
        return _plan_in_subprocess(config, target.num_chips)
    devices = target_devices(target, tpu_compiler)
    capacity = (int(config.plan_capacity_gib * GIB) if config.plan_capacity_gib > 0
                else capacity_per_device(target, devices))
    tried = []
    for setting in candidates(config, len(devices)):
        try:
            result = compile_step(with_setting(config, setting), hf_config, devices)
        except Exception as e:  # e.g. a mesh the model does not divide: record it, try the next
            mesh_cfg = sharding_lib.MeshConfig(setting["mesh_data"], setting["mesh_fsdp"],
                                               setting["mesh_tensor"])
            try:
                mesh_shape = sharding_lib.mesh_shape(mesh_cfg, len(devices))
            except ValueError:
                mesh_shape = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
            result = {"setting": setting, "batch_layout": config.batch_layout,
                      "remat_policy": (setting["remat_policy"] if setting["gradient_checkpointing"]
                                       else "none"),
                      "mesh": dict(zip(sharding_lib.AXES, mesh_shape)),
                      "logits_chunk_size": setting["logits_chunk_size"],
                      "error": f"{type(e).__name__}: {str(e)[:500]}", "fits": False}
        else:
            result["compiler"] = "tpu" if tpu_compiler else "cpu"
            result = verdict(result, target, capacity)
        result["overrides"] = overrides(config, setting)
        tried.append(result)
        print(format_row(config.plan_target, result), flush=True)
        if result["fits"]:
            break
    out = {"target": config.plan_target, "platform": target.platform,
           "topology": target.topology or (
               f"{target.num_chips} chip(s) of {target.proxy} through the TPU compiler"
               if tpu_compiler else f"{target.num_chips} simulated CPU devices"),
           "model": config.model_name_or_path or "model_init", "capacity_bytes": capacity,
           "tried": tried, "choice": next((r for r in tried if r["fits"]), None)}
    if out["choice"] is None:
        out["next_steps"] = next_steps(config, out)
    if jax.process_index() == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "plan.json"), "w") as f:
            json.dump(out, f, indent=2)
    print(format_table(out), flush=True)
    if out["choice"] is None:
        print("Nothing tried fits. What to try next:\n" +
              "\n".join(f"- {step}" for step in out["next_steps"]), flush=True)
    elif out["choice"]["overrides"]:
        print("Fits with these overrides (paste them after your command):\n  "
              + " ".join(out["choice"]["overrides"]), flush=True)
    else:
        print("Fits as configured.", flush=True)
    return out


def _plan_in_subprocess(config, num_devices: int) -> dict:
    """The GPU estimate in a fresh Python whose XLA_FLAGS give it `num_devices` CPU devices."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (paths.REPO_ROOT, env.get("PYTHONPATH", ""))
                                        if p)
    subprocess.run([sys.executable, "-m", "simpo_jax.plan"], input=config.to_json(), text=True,
                   env=env, check=True)
    with open(os.path.join(config.output_dir, "plan.json")) as f:
        return json.load(f)


if __name__ == "__main__":  # the GPU estimate's subprocess: a JSON config on stdin
    import sys

    import ml_collections

    plan(ml_collections.ConfigDict(json.loads(sys.stdin.read()), allow_dotted_keys=True))
