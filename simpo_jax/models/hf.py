"""Hugging Face checkpoint keys <-> our parameter paths, and streamed safetensors in and out.

One declared table, used in both directions: our paths equal HF keys, except that decoder
layers are stacked on axis 0 (`model.layers.X` [L, ...] <-> `model.layers.{i}.X` for each i),
that a multimodal checkpoint keeps its language model under another prefix (KeyLayout), and that
phi3 fuses q/k/v and gate/up into one tensor each (FUSED: split on import, concatenated on export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from simpo_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Where our parameters sit among a checkpoint's keys."""

    prefix: str = "model."  # HF prefix of our `model.` paths
    head: str = "lm_head.weight"  # HF key of our `lm_head.weight`
    fused: bool = False  # FUSED applies (phi3)
    carry: bool = False  # other keys (vision tower, projector) are not ours: exported unchanged


# (our path pattern, HF key template, transform). "stack": HF has one tensor per layer, stacked
# on axis 0 here (inverse: unstack); "identity": same tensor.
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    (r"^model\.layers\.(?P<rest>.+)$", "{prefix}layers.{layer}.{rest}", "stack"),
    (r"^model\.(?P<rest>.+)$", "{prefix}{rest}", "identity"),
    (r"^lm_head\.weight$", "{head}", "identity"),
    (r"^score\.weight$", "score.weight", "identity"),  # a reward model's head (onpolicy/reward)
)
# With KeyLayout.fused: (HF name inside a layer, our names concatenated on axis 0 in this order).
FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn.qkv_proj.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
)
FUSED_MODEL_TYPES = ("phi3",)
# model_type of a multimodal checkpoint -> (prefix, head) of its language model: the layout
# transformers 5 writes (and the Hub checkpoints use) first, then the one it holds in memory.
MULTIMODAL_LAYOUTS = {
    "gemma3": (("language_model.model.", "language_model.lm_head.weight"),
               ("model.language_model.", "lm_head.weight")),
}
# Checkpoint keys that carry no parameters of ours (buffers some exporters wrote).
IGNORED_KEYS = (r"rotary_emb\.inv_freq$",)


def key_layout(model_type: str, checkpoint_keys=()) -> KeyLayout:
    """The KeyLayout of a model type; multimodal: the prefix the checkpoint's keys use."""
    if model_type in MULTIMODAL_LAYOUTS:
        options = MULTIMODAL_LAYOUTS[model_type]
        for prefix, head in options:
            if any(k.startswith(prefix) for k in checkpoint_keys):
                return KeyLayout(prefix, head, carry=True)
        return KeyLayout(*options[0], carry=True)
    return KeyLayout(fused=model_type in FUSED_MODEL_TYPES)


def hf_keys(path: str, num_layers: int, layout: KeyLayout = KeyLayout()
            ) -> tuple[list[str], str, int]:
    """HF keys of one of our parameter paths (one per layer when stacked), the transform, and the
    path's place among the parts of a fused tensor (0 when not fused)."""
    for pattern, template, transform in KEY_TABLE:
        m = re.match(pattern, path)
        if m:
            fields = dict(m.groupdict(), prefix=layout.prefix, head=layout.head)
            part = 0
            if transform == "stack" and layout.fused:
                for fused, parts in FUSED:
                    if fields["rest"] in parts:
                        part, fields["rest"] = parts.index(fields["rest"]), fused
            if transform == "stack":
                return ([template.format(layer=i, **fields) for i in range(num_layers)],
                        transform, part)
            return [template.format(**fields)], transform, part
    raise AssertionError(path)


@dataclasses.dataclass
class Entry:
    """One checkpoint tensor: our (path, layer or None) parts, concatenated on axis 0."""

    key: str
    parts: list[tuple[str, int | None]]
    part_shapes: list[tuple[int, ...]]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.part_shapes[0]
        return (sum(s[0] for s in self.part_shapes),) + tuple(first[1:])


def entries(shapes: list[tuple[str, tuple[int, ...]]], num_layers: int,
            layout: KeyLayout = KeyLayout()) -> list[Entry]:
    """The checkpoint tensors of our parameters ((path, shape) pairs, stacked shapes with their
    leading L), in Hugging Face order: embeddings, layer 0, 1, ..., the rest."""
    found: dict[str, list] = {}
    first, layers, last = [], [[] for _ in range(num_layers)], []
    for path, shape in shapes:
        keys, transform, part = hf_keys(path, num_layers, layout)
        for i, key in enumerate(keys):
            layer = i if transform == "stack" else None
            if key not in found:
                found[key] = []
                (layers[i] if layer is not None else
                 first if "embed_tokens" in path else last).append(key)
            found[key].append((part, path, layer, tuple(shape[1:] if layer is not None else shape)))
    out = []
    for key in first + [k for keys in layers for k in keys] + last:
        parts = sorted(found[key], key=lambda p: p[0])
        out.append(Entry(key, [(p, layer) for _, p, layer, _ in parts], [s for *_, s in parts]))
    return out


def param_leaves(state) -> list[tuple[str, Any]]:
    """(dot path, leaf) for every array leaf of an nnx.State (the `.value` suffix dropped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [(sharding_lib.path_str(p), leaf) for p, leaf in flat]


def _numpy_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        dtype = {"bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
                 "float32": np.float32, "fp32": np.float32, "float16": np.float16}[dtype]
    return np.dtype(dtype)


class _Checkpoint:
    """Tensor-by-tensor reader over model.safetensors or a sharded index."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {path}.")
        self._open: dict[str, Any] = {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or its rows [start, stop) only (read without the rest)."""
        if rows is None:
            return self._handle(key).get_tensor(key)
        return self._handle(key).get_slice(key)[rows[0]:rows[1]]

    def _handle(self, key):
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file]


def carried_keys(keys, layout: KeyLayout) -> list[str]:
    """Keys of a checkpoint that are not ours (KeyLayout.carry): exported unchanged."""
    if not layout.carry:
        return []
    return [k for k in keys if not k.startswith(layout.prefix) and k != layout.head
            and not any(re.search(r, k) for r in IGNORED_KEYS)]


def load_state(path: str, abstract_state, shardings, num_layers: int, tie_word_embeddings: bool,
               model_type: str = "llama"):
    """Reads the checkpoint at `path` into arrays placed in `shardings` (same tree as abstract_state).

    One stacked tensor at a time is assembled on the host; every device receives only its slice.
    """
    ckpt = _Checkpoint(path)
    layout = key_layout(model_type, ckpt.files)
    leaves = param_leaves(abstract_state)
    plan = entries([(p, tuple(x.shape)) for p, x in leaves], num_layers, layout)
    wanted = {e.key: e.shape for e in plan}
    ignored = [re.escape(layout.head) + "$"] if tie_word_embeddings else []
    carried = set(carried_keys(ckpt.files, layout))
    unexpected = [k for k in ckpt.files if k not in wanted and k not in carried
                  and not any(re.search(r, k) for r in list(IGNORED_KEYS) + ignored)]
    if unexpected:
        raise ValueError(f"Unexpected tensor {unexpected[0]!r} in {path} "
                         f"({len(unexpected)} unexpected: {unexpected[:5]}); it has no parameter "
                         "in this architecture.")
    for k, shape in wanted.items():
        if k not in ckpt.files:
            raise ValueError(f"Missing tensor {k!r} (expected shape {tuple(shape)}) in {path}.")
        if ckpt.shape(k) != tuple(shape):
            raise ValueError(f"Tensor {k!r} has shape {ckpt.shape(k)} in {path}; expected "
                             f"{tuple(shape)}.")
    source = {}  # (path, layer) -> (key, rows or None for the whole tensor)
    for e in plan:
        start = 0
        for part, shape in zip(e.parts, e.part_shapes):
            whole = len(e.parts) == 1
            source[part] = (e.key, None if whole else (start, start + shape[0]))
            start += shape[0]

    flat_sh = jax.tree_util.tree_leaves(shardings)
    arrays = []
    for (p, leaf), sh in zip(leaves, flat_sh):
        dtype = np.dtype(leaf.dtype)
        if (p, None) in source:
            host = ckpt.get(*source[(p, None)]).astype(dtype)
        else:
            host = np.stack([ckpt.get(*source[(p, i)]).astype(dtype) for i in range(num_layers)])
        arrays.append(jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx]))
        del host
    treedef = jax.tree_util.tree_structure(abstract_state)
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _host(x) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array; every process must call this."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def iter_hf_tensors(state, num_layers: int, layout: KeyLayout = KeyLayout()
                    ) -> Iterator[tuple[str, list[tuple[Any, int | None]], tuple[int, ...]]]:
    """(HF key, [(leaf, layer index or None)] concatenated on axis 0, shape) in Hugging Face
    order, without fetching data."""
    leaves = dict(param_leaves(state))
    for e in entries([(p, tuple(x.shape)) for p, x in leaves.items()], num_layers, layout):
        yield e.key, [(leaves[p], layer) for p, layer in e.parts], e.shape


def _value(parts) -> np.ndarray:
    arrays = [_host(x if layer is None else x[layer]) for x, layer in parts]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def to_hf_tensors(state, num_layers: int, layout: KeyLayout = KeyLayout()) -> dict[str, np.ndarray]:
    """Every parameter as a host array under its Hugging Face key (stacked layers split, phi3's
    projections fused)."""
    return {key: _value(parts) for key, parts, _ in iter_hf_tensors(state, num_layers, layout)}


def parse_size(size) -> int:
    """'5GB', '500MB', '10KB' or an int of bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size).upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB', '200MB'.")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(float(m.group(1)) * units[m.group(2)])


def save_state(state, out_dir: str, num_layers: int, *, dtype=None, max_shard_size="5GB",
               layout: KeyLayout = KeyLayout(), carry_from: str | None = None) -> list[str]:
    """Writes safetensors shards (plus index when more than one); one shard on the host at a time.

    carry_from: a checkpoint folder whose tensors that are not ours (carried_keys: a multimodal
    checkpoint's vision tower and projector) are written after ours unchanged, bit for bit.
    """
    limit = parse_size(max_shard_size)
    entries_ = [(key, parts, shape, _numpy_dtype(dtype) if dtype is not None
                 else np.dtype(parts[0][0].dtype))
                for key, parts, shape in iter_hf_tensors(state, num_layers, layout)]
    carried = _Checkpoint(carry_from) if carry_from else None
    if carried is not None:
        for key in carried_keys(carried.files, layout):  # dtype None: the stored one
            entries_.append((key, None, carried.shape(key), None))
    shards, current, size = [], [], 0
    for entry in entries_:
        itemsize = entry[3].itemsize if entry[3] is not None else _itemsize(carried, entry[0])
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)

    write = jax.process_index() == 0
    if write:  # weights of an earlier export here would be mixed with these (or pushed)
        for old in os.listdir(out_dir):
            if old == "model.safetensors.index.json" or re.fullmatch(
                    r"model(-\d+-of-\d+)?\.safetensors", old):
                os.remove(os.path.join(out_dir, old))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for key, parts, _, dt in shard:
            if parts is None:  # carried unchanged
                tensors[key] = np.ascontiguousarray(carried.get(key))
            else:
                tensors[key] = np.ascontiguousarray(_value(parts).astype(dt))
            weight_map[key] = name
            total += tensors[key].nbytes
        if write:
            save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        del tensors
    if write and len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _itemsize(ckpt: _Checkpoint, key: str) -> int:
    return _ITEMSIZE[ckpt._handle(key).get_slice(key).get_dtype()]
