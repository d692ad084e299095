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

import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from simpo_jax import flops
from simpo_jax import lora as lora_lib
from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import optim
from simpo_jax.plan_report import GIB, _gib, format_row, format_table
from simpo_jax.plan_search import candidates, overrides, setting_of, with_setting
from simpo_jax import precision
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib
from simpo_jax.data.batcher import make_batcher
from simpo_jax.errors import UserError
from simpo_jax import paths


ASSETS = os.path.join(paths.ASSETS, "model_configs")


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str  # "tpu" (real AOT compile) or "gpu" (estimate on simulated CPU devices)
    topology: str  # libtpu topology name; "" for GPU
    chip_gib: float  # memory per chip
    num_chips: int
    proxy: str = ""  # GPU targets: the libtpu topology whose first num_chips chips stand in
    first_chips: int = 0  # > 0: compile for the topology's first chips only (one v5e chip)


TARGETS = {
    "tpu-v5e-8": Target("tpu", "v5e:2x4", 16, 8),
    "tpu-v5p-8": Target("tpu", "v5p:2x2x1", 95, 4),  # v5p-N counts TensorCores: 4 chips
    "tpu-v5p-32": Target("tpu", "v5p:2x2x4", 95, 16),  # 70B-class models
    "tpu-v5p-64": Target("tpu", "v5p:2x4x4", 95, 32),
    "tpu-v4-32": Target("tpu", "v4:2x2x4", 32, 16),  # 16 chips; libtpu exposes 2 cores per chip
    "tpu-v6e-8": Target("tpu", "v6e:2x4", 32, 8),
    # GPU targets are estimates: by default the TPU compiler for v5p chips (95 GiB each, so the
    # compiler accepts what an 80 GB GPU could hold and reports its real buffers), else
    # (plan_gpu_compiler="cpu") simulated CPU devices next to an analytic count.
    "gpu-h100x8": Target("gpu", "", 80, 8, proxy="v5p:2x2x2"),
    "gpu-h100x1": Target("gpu", "", 80, 1, proxy="v5p:2x2x1"),
    "gpu-a100x1": Target("gpu", "", 40, 1, proxy="v5p:2x2x1"),
    "tpu-v5e-1": Target("tpu", "v5e:2x2", 16, 1, first_chips=1),  # one 16 GiB chip (Colab-sized)
}

# Words of libtpu's refusal when another process holds its lockfile: the ABORTED message ("...
# when accessing libtpu multi-process lockfile. Run "$ sudo rm /tmp/libtpu_lockfile".") or, from
# other libtpu versions, "The TPU is already in use by process with pid ...".
LIBTPU_LOCKED = ("libtpu_lockfile", "multi-process lockfile", "TPU is already in use")
LIBTPU_LOCKED_MESSAGE = (
    "--mode=plan: another process holds libtpu's lockfile (/tmp/libtpu_lockfile; any JAX process "
    "on a host with libtpu installed takes it, even a CPU run without JAX_PLATFORMS=cpu): rerun "
    "with ALLOW_MULTIPLE_LIBTPU_LOAD=1 (the plan only compiles, it never runs on TPU chips).")

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


def uses_tpu_compiler(target: Target, config) -> bool:
    """TPU targets, and GPU targets estimated by the TPU compiler (plan_gpu_compiler="tpu")."""
    if target.platform == "tpu":
        return True
    import importlib.util

    return config.plan_gpu_compiler == "tpu" and importlib.util.find_spec("libtpu") is not None


def _tpu_devices(topology_name: str) -> list:
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    except Exception as e:  # jax.errors.JaxRuntimeError from libtpu's start
        if any(word in str(e) for word in LIBTPU_LOCKED):
            raise UserError(LIBTPU_LOCKED_MESSAGE) from None
        raise
    return list(topology.devices)


def target_devices(target: Target, tpu_compiler: bool = True) -> list:
    """Devices to compile for: the TPU topology's (no chips needed; a GPU target's stand-in
    chips when tpu_compiler) or num_chips CPU devices."""
    if target.platform == "tpu":
        devices = _tpu_devices(target.topology)
        return devices[:target.first_chips] if target.first_chips else devices
    if tpu_compiler:
        return _tpu_devices(target.proxy)[:target.num_chips]
    cpus = jax.devices("cpu")
    if len(cpus) < target.num_chips:
        raise RuntimeError(
            f"The {target.num_chips}-GPU estimate compiles for {target.num_chips} CPU devices but "
            f"only {len(cpus)} exist: start Python with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={target.num_chips} (before jax is imported).")
    return cpus[:target.num_chips]


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


def compile_step(config, hf_config: dict, devices):
    """Lowers and compiles the train step the config would run, on abstract inputs.

    The configured batch layout, remat policy, logits chunks, memory modes and offloading, on
    the configured mesh: the per-device figures.
    """
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config), devices)
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    remat = config.remat_policy if config.gradient_checkpointing else "none"
    master = precision.param_dtype(config.master_weights)

    def build_model():
        # A LoRA base is frozen in the compute dtype (as build.load_params holds it).
        model = models.from_config(hf_config, dtype=dtype,
                                   param_dtype=dtype if config.lora_rank else master,
                                   remat_policy=remat, attention=config.attention_implementation)
        if config.lora_rank:
            lora_lib.add_adapters(model, lora_lib.LoraConfig.from_config(config),
                                  param_dtype=master)
            if config.lora_base_quantization == "int8":
                lora_lib.quantize_base(model, config.lora_target_modules)
        return model

    model = nnx.eval_shape(build_model)
    frozen = frozen_sh = None
    if config.lora_rank:
        graphdef, params, frozen = lora_lib.split(model)
        frozen_sh = sharding_lib.param_shardings(mesh, frozen)
    else:
        graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = optim.make_optimizer(optim.OptimConfig.from_config(config), total_steps=1000)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    train_step, state_sh = step_lib.jit_train_step(
        mesh, abstract_state, batch_layout=config.batch_layout,
        offload_optimizer_state=config.offload_optimizer_state, graphdef=graphdef, tx=tx,
        schedule=schedule, cfg=loss_lib.LossConfig.from_config(config),
        accumulation_steps=config.gradient_accumulation_steps,
        logits_chunk_size=config.logits_chunk_size, frozen_shardings=frozen_sh)
    batch, pairs, tokens = make_batcher(config, mesh).abstract_batch()
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, state_sh)
    params_b = _sharded_bytes(abstract_state.params, state_sh.params)
    frozen_b = 0
    if frozen is not None:
        frozen_b = _sharded_bytes(frozen, frozen_sh)
        frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              frozen, frozen_sh)
    opt_b = _sharded_bytes(abstract_state.opt_state, state_sh.opt_state)
    host_b = opt_b if config.offload_optimizer_state else 0
    arch = model.arch
    t = config.max_length if config.batch_layout == "padded" else batch.input_ids.shape[1]
    per_device_rows = batch.input_ids.shape[0] // (sharding_lib.data_parallel_size(mesh)
                                                   * config.gradient_accumulation_steps)
    result = {
        "setting": setting_of(config), "batch_layout": config.batch_layout,
        "remat_policy": remat, "mesh": dict(mesh.shape),
        "logits_chunk_size": config.logits_chunk_size,
        "num_devices": len(devices), "global_batch_pairs": pairs,
        "micro_batch_pairs_per_device": config.per_device_train_batch_size,
        "accumulation_steps": config.gradient_accumulation_steps, "max_length": config.max_length,
        "row_length": t, "rows_per_device": per_device_rows,
        "num_params": sum(x.size for x in jax.tree.leaves(params)),
        "params_bytes": params_b, "opt_state_bytes": opt_b - host_b, "host_bytes": host_b,
        "frozen_bytes": frozen_b,  # LoRA: the frozen base (params_bytes: the adapters)
        "batch_bytes": _sharded_bytes(batch, jax.tree.map(lambda x: x.sharding, batch)),
        "model_flops_per_step": flops.model_flops(arch, tokens, t),  # PaLM convention
        "activation_estimate_bytes": activation_estimate(
            arch, pairs=per_device_rows if config.batch_layout == "padded" else per_device_rows / 2,
            length=t, remat=remat, dtype_bytes=jnp.dtype(dtype).itemsize,
            tensor=mesh.shape["tensor"], logits_chunk_size=config.logits_chunk_size),
    }
    lowered = (train_step.lower(state, batch) if frozen is None
               else train_step.lower(state, batch, frozen))
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
                      temp_bytes=int(temp),
                      total_bytes=int(params_b + frozen_b + opt_b - host_b + temp),
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


def capacity_per_device(target: Target, devices) -> int:
    """Chip memory split over the devices a chip exposes (v4: two TensorCores per chip)."""
    per_chip = max(1, len(devices) // target.num_chips)
    return int(target.chip_gib * GIB / per_chip)


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


def next_steps(config, out: dict) -> list[str]:
    """What to try when no configuration tried fits, cheapest first."""
    if not any("needed_bytes" in r for r in out["tried"]):
        return ["no configuration compiled: the compiler's errors are above (and in plan.json); "
                "memory settings cannot help until one compiles."]
    steps = []
    if not config.plan_search:
        steps.append("--config.plan_search=True: also tries, one after another, full remat, "
                     "logits chunks of 256, bfloat16 moments, bfloat16 masters (kahan, then "
                     "stochastic), the optimizer state in host memory, smaller micro-batches with "
                     "more accumulation and a tensor axis of 2 (the effective batch kept), "
                     "stopping at the first that fits and printing its overrides.")
    if not config.gradient_checkpointing:
        steps.append("--config.gradient_checkpointing=True (remat_policy full): keeps one "
                     "activation per layer instead of every intermediate.")
    if not config.logits_chunk_size:
        steps.append("--config.logits_chunk_size=256: the LM head and log-softmax in chunks, never "
                     "the full [tokens, vocab] float32 logits.")
    if config.per_device_train_batch_size > 1 and not config.plan_search:
        smaller = config.per_device_train_batch_size // 2
        steps.append(
            f"--config.per_device_train_batch_size={smaller} "
            f"--config.gradient_accumulation_steps={config.gradient_accumulation_steps * 2}: "
            "half the activations per micro-batch, the same effective batch.")
    current = TARGETS[out["target"]]
    bigger = sorted((t.chip_gib * t.num_chips, name) for name, t in TARGETS.items()
                    if t.chip_gib * t.num_chips > current.chip_gib * current.num_chips)
    if bigger:
        listed = ", ".join(f"{name} ({TARGETS[name].num_chips} x {TARGETS[name].chip_gib:g} GiB)"
                           for _, name in bigger[:3])
        steps.append(f"a bigger target (--config.plan_target=...): {listed}; this one has "
                     f"{current.num_chips} x {current.chip_gib:g} GiB.")
    needed = [r["needed_bytes"] for r in out["tried"] if "needed_bytes" in r]
    if needed:
        steps.append(f"the smallest configuration tried needs {_gib(min(needed))} GiB per device "
                     f"of {_gib(out['capacity_bytes'])}. Float32 masters with AdamW are 12 bytes "
                     "per parameter before gradients; the search also tries "
                     "bfloat16 moments, bfloat16 masters (kahan, stochastic) and the optimizer "
                     "state in host memory (docs/memory_plans.md).")
    return steps


def _plan_in_subprocess(config, num_devices: int) -> dict:
    """The GPU estimate in a fresh Python whose XLA_FLAGS give it `num_devices` CPU devices."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
    root = os.path.dirname(os.path.dirname(ASSETS))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-m", "simpo_jax.plan"], input=config.to_json(), text=True,
                   env=env, check=True)
    with open(os.path.join(config.output_dir, "plan.json")) as f:
        return json.load(f)


if __name__ == "__main__":  # the GPU estimate's subprocess: a JSON config on stdin
    import sys

    import ml_collections

    plan(ml_collections.ConfigDict(json.loads(sys.stdin.read()), allow_dotted_keys=True))
