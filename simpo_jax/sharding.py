"""Device mesh, the parameter-path -> PartitionSpec table, and batch shardings.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded, ZeRO-3 style) and `tensor` (Megatron-style tensor parallelism).

All axes are `AxisType.Auto`: the train step pins its inputs and outputs with explicit
NamedShardings and XLA's partitioner propagates everything in between. Explicit axis types
(the JAX 0.10 default) would make every einsum in the model declare its output sharding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from simpo_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter path (dot-joined NNX path, mirroring Hugging Face keys; stacked layers carry a
# leading layer axis) -> PartitionSpec. First match wins. Parameters are stored in Hugging Face
# orientation: Linear weights are [out_features, in_features], embeddings [vocab, hidden].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens\.weight$", P("tensor", "fsdp")),
    (r"lm_head\.weight$", P("tensor", "fsdp")),
    (r"layers\..*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", P(None, "tensor", "fsdp")),
    (r"layers\..*(o_proj|down_proj)\.weight$", P(None, "fsdp", "tensor")),
    (r"layers\..*(q_proj|k_proj|v_proj)\.bias$", P(None, "tensor")),
    # LoRA adapters follow their base weight W [L, out, in]: A [L, r, in] is split along `in` as
    # W is, B [L, out, r] along `out`; the rank axis is never split.
    (r"layers\..*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_A$", P(None, None, "fsdp")),
    (r"layers\..*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_B$", P(None, "tensor", None)),
    (r"layers\..*(o_proj|down_proj)\.lora_A$", P(None, None, "tensor")),
    (r"layers\..*(o_proj|down_proj)\.lora_B$", P(None, "fsdp", None)),
    # An int8 LoRA base's per-output-row scales [L, out, 1] follow the weight's `out` split.
    (r"layers\..*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight_scale$", P(None, "tensor", None)),
    (r"layers\..*(o_proj|down_proj)\.weight_scale$", P(None, "fsdp", None)),
    (r"norm", P()),  # RMSNorm weights: small, replicated
    (r".*", P()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 fills the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def from_config(cls, config) -> "MeshConfig":
        return cls(data=config.mesh_data, fsdp=config.mesh_fsdp, tensor=config.mesh_tensor)


def mesh_shape(mesh_config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the -1 entry; UserError when the sizes do not match the device count.

    Each size positive or -1, at most one -1: the config schema checked that.
    """
    sizes = {"data": mesh_config.data, "fsdp": mesh_config.fsdp, "tensor": mesh_config.tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % fixed:
            raise UserError(
                f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes "
                f"(product {fixed}); choose sizes whose product divides {num_devices}."
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise UserError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are "
            "available; set one of mesh_data/mesh_fsdp/mesh_tensor to -1 to fill."
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def path_str(path: Sequence[Any]) -> str:
    """Dot-joined parameter path from a pytree key path or an NNX state path."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue  # nnx.Variable leaves flatten with a trailing `.value`
        k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(k))
    return ".".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The table's PartitionSpec for `path`, dropping axes that do not divide the dimension."""
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            break
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    if len(spec) > len(shape):  # rule written for a stacked tensor applied to an unstacked one
        spec = spec[len(spec) - len(shape):]
    out = []
    for dim, axis in zip(shape, spec):
        size = 1 if axis is None else mesh.shape[axis]
        out.append(axis if axis is not None and size > 1 and dim % size == 0 else None)
    return P(*out)


def param_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for every array leaf of a pytree (e.g. an nnx.State of parameters)."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_str(path), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def placement(mesh: Mesh | None, abstract_tree: Any) -> Any:
    """Where a loader puts each leaf: the partition table on `mesh`, else the first device."""
    if mesh is not None:
        return param_shardings(mesh, abstract_tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda _: device, abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batches are split over data x fsdp along their leading (pair) axis."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def initialize_distributed(coordinator_address: str = "", num_processes: int = -1,
                           process_id: int = -1) -> None:
    """Joins a multi-process run through JAX's own runtime, before any other JAX call.

    With a coordinator address (GPU clusters, CPU tests) the three values come from the config or
    from the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables.
    On TPU pods and SLURM jobs `jax.distributed.initialize()` detects them itself; set
    coordinator_address="auto" for that. An empty address means a single-process run.
    """
    import os

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not coordinator_address:
        return
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return
    num_processes = num_processes if num_processes > 0 else int(os.environ["JAX_NUM_PROCESSES"])
    process_id = process_id if process_id >= 0 else int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):  # no backend call before init
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
