"""The planner's targets: named TPU slices (compiled by libtpu with no chips) and GPU estimates."""

from __future__ import annotations

import dataclasses

import jax

from simpo_jax.errors import UserError

GIB = 2**30


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


def capacity_per_device(target: Target, devices) -> int:
    """Chip memory split over the devices a chip exposes (v4: two TensorCores per chip)."""
    per_chip = max(1, len(devices) // target.num_chips)
    return int(target.chip_gib * GIB / per_chip)
