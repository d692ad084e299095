"""Array checksums: the global values decide them, never the sharding; any changed byte shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from simpo_jax import checksum

VALUES = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)


def reference(x: np.ndarray) -> int:
    """The checksum in numpy, written from the module docstring's definition."""
    words = x.view(np.uint32).ravel().astype(np.uint64)
    h = words ^ (np.arange(words.size, dtype=np.uint64) * 0x9E3779B9 % 2**32)
    h ^= h >> 16
    h = h * 0x85EBCA6B % 2**32
    h ^= h >> 13
    h = h * 0xC2B2AE35 % 2**32
    h ^= h >> 16
    return int(h.sum() % 2**32)


def test_checksum_equals_a_numpy_reference():
    assert checksum.checksums({"a": jnp.asarray(VALUES)}) == {"['a']": reference(VALUES)}


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_checksum_is_the_same_on_every_mesh_and_in_host_memory(axis_type):
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(axis_type,) * 2)
    placed = [NamedSharding(mesh, spec) for spec in (P("a", "b"), P("b", "a"), P(None, "a"), P())]
    placed.append(NamedSharding(mesh, P("a"), memory_kind="pinned_host"))  # offloaded moments
    for sharding in placed:
        got = checksum.checksums({"a": jax.device_put(VALUES, sharding)})
        assert got == {"['a']": reference(VALUES)}, sharding


def test_every_changed_byte_and_swapped_values_change_the_checksum():
    before = checksum.checksums([VALUES])
    raw = VALUES.tobytes()
    for i in range(0, len(raw), 61):
        changed = bytearray(raw)
        changed[i] ^= 0x5A
        after = np.frombuffer(bytes(changed), np.float32).reshape(VALUES.shape)
        assert checksum.checksums([after]) != before, i
    swapped = VALUES.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checksum.checksums([swapped]) != before


def test_every_dtype_of_a_state_has_a_checksum():
    state = {"bf16": jnp.asarray(VALUES, jnp.bfloat16), "int8": jnp.arange(5, dtype=jnp.int8),
             "flag": jnp.array([True, False]), "step": jnp.zeros((), jnp.int32),
             "key": jax.random.key(0)}
    sums = checksum.checksums(state)
    assert set(sums) == {f"['{k}']" for k in state} and all(0 <= v < 2**32 for v in sums.values())
    state["bf16"] = state["bf16"].at[3, 4].add(1)
    assert checksum.checksums(state)["['bf16']"] != sums["['bf16']"]


def test_the_cost_bench_runs(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "checkpoint_checksum.py")
    spec = importlib.util.spec_from_file_location("checkpoint_checksum", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = bench.main(["--dry-run"])
    assert {"checksum", "save returns, checked", "restore, checked"} <= set(times)
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in times.values())
    assert "| checksum |" in capsys.readouterr().out


def test_one_program_per_device_set(monkeypatch):
    """Dozens of independent programs with cross-device sums in flight at once deadlock XLA's CPU
    runtime (it aborted CI), so the leaves on one set of devices are summed by one program whose
    sums are read before the next starts; a leaf committed to one device gets its own program."""
    rows = NamedSharding(jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,)), P("d"))
    state = {f"w{i}": jax.device_put(VALUES + i, rows) for i in range(30)}
    state["step"] = jax.device_put(np.int32(7), jax.devices()[0])
    programs, real = [], checksum._checksum_all

    def counted(arrays, read_from):
        programs.append(len(arrays))
        return real(arrays, read_from)

    monkeypatch.setattr(checksum, "_checksum_all", counted)
    sums = checksum.checksums(state)
    assert sorted(programs) == [1, 30]
    assert sums["['w3']"] == reference(VALUES + 3)
    assert sums["['step']"] == reference(np.array([7], np.int32))
