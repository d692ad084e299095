"""Accelerator attention behind one entry point: splash on TPU, flash with segment ids on GPU.

`attention` takes the rows' segment structure (rows.RowMask) instead of a [B, T, S] mask and
equals layers.attention with layers.base_mask / window_mask on every query that sees a key
(tests/test_kernels.py). On a CPU the kernels run in Pallas interpret mode: slow, for tests and
for checking a kernel against the XLA path on a laptop. Under a context mesh (jax.set_mesh) the
kernel runs per shard in a shard_map, rows over the batch axes and heads over `tensor`: Mosaic
kernels cannot be partitioned automatically.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simpo_jax.models.kernels import rows
from simpo_jax.models.kernels.flash import flash_call
from simpo_jax.models.kernels.rows import RowMask
from simpo_jax.models.kernels.splash import splash_call
from simpo_jax.sharding import BATCH_AXES

__all__ = ["KERNELS", "RowMask", "attention", "platform", "reasons"]

KERNELS = {"splash": splash_call, "flash": flash_call}
HOME = {"splash": "tpu", "flash": "gpu"}  # where each runs compiled; on a CPU, interpreted


def platform() -> str:
    """Where the arrays live: the context mesh's platform, else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    name = jax.default_backend() if device is None else device.platform
    return "gpu" if name in ("cuda", "rocm") else name


def reasons(kernel: str, *, softcap: float | None, windows=(), on: str | None = None) -> list:
    """Why `kernel` cannot run here for this model (empty: it can)."""
    on = on or platform()
    out = []
    if on not in (HOME[kernel], "cpu"):
        out.append(f"{kernel} runs on {HOME[kernel]} (or interpreted on cpu), the devices are {on}")
    if kernel == "flash" and softcap is not None:
        out.append("the model soft-caps attention logits (Gemma 2), which the Pallas GPU kernel "
                   "cannot")
    if kernel == "flash" and any(int(w) < 2**30 for w in windows):
        out.append("the model has sliding-window layers, which the Pallas GPU kernel cannot mask")
    mesh = jax.sharding.get_abstract_mesh()
    if on == HOME[kernel] == platform() and mesh.empty and jax.device_count() > 1:
        out.append(f"a {kernel} kernel on several {on} devices runs per shard and needs the mesh: "
                   "trace the step under jax.set_mesh(mesh)")
    return out


def attention(q_BTHE, k_BTKE, v_BTKE, mask: RowMask, *, kernel: str, scale: float,
              softcap: float | None, windows=()):
    """Causal grouped-query attention of rows masked by `mask`, output in the query dtype.

    windows: the model's per-layer sliding windows (static), of which mask.window is this layer's.
    """
    q_BTHE = q_BTHE * jnp.asarray(scale, q_BTHE.dtype)  # as layers.attention: in the query dtype
    run = functools.partial(_rows_attention, call=KERNELS[kernel], softcap=softcap,
                            windows=tuple(windows), interpret=platform() == "cpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q_BTHE, k_BTKE, v_BTKE, mask)
    batch = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if q_BTHE.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and k_BTKE.shape[2] % tensor == 0 else None
    spec, ids = P(batch or None, None, heads, None), P(batch or None, None)
    mask_spec = RowMask(ids, None if mask.branch_ids_BT is None else ids,
                        None if mask.window is None else P())
    return jax.shard_map(run, in_specs=(spec, spec, spec, mask_spec), out_specs=spec,
                         check_vma=False)(q_BTHE, k_BTKE, v_BTKE, mask)


def _rows_attention(q_BTHE, k_BTKE, v_BTKE, mask: RowMask, *, call, softcap, windows, interpret):
    """One kernel call for padded and packed rows, two for shared-prompt rows (rows.py)."""
    t = q_BTHE.shape[1]
    tp = rows.pad_rows(t)

    def one(q, k, v, ids):
        if tp != t:  # the tail sees only itself; its queries are dropped
            q, k, v = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (q, k, v))
            ids = jnp.pad(ids, ((0, 0), (0, tp - t)), constant_values=rows.PAD_ID)
        kernel = functools.partial(call, q, k, v, ids, softcap=softcap, interpret=interpret)
        out = rows.by_window(lambda w: kernel(window=w), mask.window,
                             rows.layer_windows(windows, t))
        return out[:, :t]

    out = one(q_BTHE, k_BTKE, v_BTKE, mask.ids_BT)
    if mask.branch_ids_BT is None:
        return out
    order = rows.rejected_first(mask.ids_BT, mask.branch_ids_BT)
    back = jnp.argsort(order, axis=1)
    moved = one(*(rows.gather_rows(x, order) for x in (q_BTHE, k_BTKE, v_BTKE, mask.ids_BT)))
    rejected = (mask.branch_ids_BT == 2)[:, :, None, None]
    return jnp.where(rejected, rows.gather_rows(moved, back), out)
