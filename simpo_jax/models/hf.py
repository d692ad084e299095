"""Hugging Face checkpoint keys <-> our parameter paths, and streamed safetensors in and out.

One declared table, used in both directions: our paths equal HF keys, except that decoder
layers are stacked on axis 0 (`model.layers.X` [L, ...] <-> `model.layers.{i}.X` for each i).
"""

from __future__ import annotations

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

# (our path pattern, HF key template, transform). "stack": HF has one tensor per layer, stacked
# on axis 0 here (inverse: unstack); "identity": same tensor.
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    (r"^model\.layers\.(?P<rest>.+)$", "model.layers.{layer}.{rest}", "stack"),
    (r"^(?P<rest>.+)$", "{rest}", "identity"),
)
# Checkpoint keys that carry no parameters of ours (buffers some exporters wrote).
IGNORED_KEYS = (r"rotary_emb\.inv_freq$",)


def hf_keys(path: str, num_layers: int) -> tuple[list[str], str]:
    """HF keys of one of our parameter paths (one per layer when stacked) and the transform."""
    for pattern, template, transform in KEY_TABLE:
        m = re.match(pattern, path)
        if m:
            if transform == "stack":
                return [template.format(layer=i, **m.groupdict()) for i in range(num_layers)], transform
            return [template.format(**m.groupdict())], transform
    raise AssertionError(path)


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

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def _handle(self, key):
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file]


def load_state(path: str, abstract_state, shardings, num_layers: int, tie_word_embeddings: bool):
    """Reads the checkpoint at `path` into arrays placed in `shardings` (same tree as abstract_state).

    One stacked tensor at a time is assembled on the host; every device receives only its slice.
    """
    ckpt = _Checkpoint(path)
    leaves = param_leaves(abstract_state)
    wanted = {}
    for p, leaf in leaves:
        keys, transform = hf_keys(p, num_layers)
        per_key = leaf.shape[1:] if transform == "stack" else leaf.shape
        for k in keys:
            wanted[k] = per_key
    ignored = [r"^lm_head\.weight$"] if tie_word_embeddings else []
    unexpected = [k for k in ckpt.files if k not in wanted
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

    flat_sh = jax.tree_util.tree_leaves(shardings)
    arrays = []
    for (p, leaf), sh in zip(leaves, flat_sh):
        keys, transform = hf_keys(p, num_layers)
        dtype = np.dtype(leaf.dtype)
        if transform == "stack":
            host = np.stack([ckpt.get(k).astype(dtype) for k in keys])
        else:
            host = ckpt.get(keys[0]).astype(dtype)
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


def iter_hf_tensors(state, num_layers: int) -> Iterator[tuple[str, Any, tuple[int, ...], Any]]:
    """(HF key, leaf, shape, layer index or None) in Hugging Face order, without fetching data."""
    leaves = param_leaves(state)
    stacked = [(p, x) for p, x in leaves if hf_keys(p, num_layers)[1] == "stack"]
    plain = [(p, x) for p, x in leaves if hf_keys(p, num_layers)[1] == "identity"]
    first = [(p, x) for p, x in plain if "embed_tokens" in p]
    last = [(p, x) for p, x in plain if "embed_tokens" not in p]
    for p, x in first:
        yield hf_keys(p, num_layers)[0][0], x, tuple(x.shape), None
    for i in range(num_layers):
        for p, x in stacked:
            yield hf_keys(p, num_layers)[0][i], x, tuple(x.shape[1:]), i
    for p, x in last:
        yield hf_keys(p, num_layers)[0][0], x, tuple(x.shape), None


def to_hf_tensors(state, num_layers: int) -> dict[str, np.ndarray]:
    """Every parameter as a host array under its Hugging Face key (stacked layers split)."""
    out = {}
    for key, x, _, layer in iter_hf_tensors(state, num_layers):
        out[key] = _host(x if layer is None else x[layer])
    return out


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


def save_state(state, out_dir: str, num_layers: int, *, dtype=None, max_shard_size="5GB") -> list[str]:
    """Writes safetensors shards (plus index when more than one); one shard on the host at a time."""
    limit = parse_size(max_shard_size)
    entries = list(iter_hf_tensors(state, num_layers))
    target = [_numpy_dtype(dtype) if dtype is not None else np.dtype(x.dtype)
              for _, x, _, _ in entries]
    shards, current, size = [], [], 0
    for entry, dt in zip(entries, target):
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * dt.itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((entry, dt))
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
        for (key, x, _, layer), dt in shard:
            tensors[key] = np.ascontiguousarray(_host(x if layer is None else x[layer]).astype(dt))
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
