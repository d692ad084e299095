"""The checkpointer: complete steps, damage on disk set aside, checksums, failures that stop."""

import errno
import gc
import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax.errors import UserError


def small_state():
    """A sharded state whose 32 KiB shards lie in data files beside OCDBT's index."""
    mesh = jax.make_mesh((8,), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    big = jax.device_put(np.arange(256 * 256, dtype=np.float32).reshape(256, 256), rows)
    return {"big": big, "count": jax.numpy.zeros((), np.int32)}


def abstract_state():
    state = small_state()
    return ckpt_lib.abstract_with_shardings(state, jax.tree.map(lambda x: x.sharding, state))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_steps")
    checkpointer = ckpt_lib.Checkpointer(str(out), save_total_limit=0)
    for step in (10, 20):
        checkpointer.save(step, jax.tree.map(lambda x: x + step, small_state()), {"step": step})
    checkpointer.close()
    return out


@pytest.fixture
def checkpoints(two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def index_files(step_dir):
    return glob.glob(str(step_dir / "state" / "d" / "*"))


def data_file(step_dir):
    return max(glob.glob(str(step_dir / "state" / "ocdbt.process_*" / "d" / "*")),
               key=os.path.getsize)


def cut_short(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def overwrite(path, tail_only=False):
    with open(path, "r+b") as f:
        f.seek(-16 if tail_only else 0, os.SEEK_END if tail_only else os.SEEK_SET)
        f.write(b"\x13" * (16 if tail_only else os.path.getsize(path)))


def overwrite_random_bytes(path, rng):
    """XORs 1-64 bytes at a random offset of `path` with nonzero bytes, so every one changes."""
    size = os.path.getsize(path)
    n = min(int(rng.integers(1, 65)), size)
    offset = int(rng.integers(0, size - n + 1))
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ int(x) for b, x in zip(old, rng.integers(1, 256, n))))


def garble(path):
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(b"\x00garbled")


def unlist_an_array(step_dir):
    path = step_dir / "state" / "_METADATA"
    tree = json.loads(path.read_text())
    tree["tree_metadata"]["('gone',)"] = {
        "key_metadata": [{"key": "gone", "key_type": 2}],
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                           "write_shape": [2]}}
    path.write_text(json.dumps(tree))


DAMAGE = {  # how a step folder can be damaged on disk -> words the skip warning names
    "index file deleted": (lambda d: [os.remove(f) for f in index_files(d)], "NOT_FOUND"),
    "index file garbled": (lambda d: [overwrite(f, tail_only=True) for f in index_files(d)],
                           "array index does not read"),
    "data file deleted": (lambda d: os.remove(data_file(d)), "FAILED_PRECONDITION"),
    "data file cut short": (lambda d: cut_short(data_file(d)), "OUT_OF_RANGE"),
    "data file overwritten": (lambda d: overwrite(data_file(d)), "FAILED_PRECONDITION"),
    "meta not JSON": (lambda d: (d / "meta" / "metadata").write_text("{"),
                      "meta/metadata is not valid JSON"),
    "state metadata emptied": (lambda d: (d / "state" / "_METADATA").write_text(""),
                               "state/_METADATA is not valid JSON"),
    "state deleted": (lambda d: shutil.rmtree(d / "state"), "state/ is missing"),
    "state metadata deleted": (lambda d: os.remove(d / "state" / "_METADATA"),
                               "state/_METADATA is missing"),
    "array metadata garbled": (lambda d: garble(d / "state" / "array_metadatas" / "process_0"),
                               "state/array_metadatas/process_0 is not valid JSON"),
    "array bytes overwritten": (lambda d: overwrite_random_bytes(data_file(d),
                                                                 np.random.default_rng(1)),
                                "do not match the checksums saved with them (['big'])"),
    "array not in index": (unlist_an_array, "1 of the 3 arrays"),
}


@pytest.fixture
def abandoned_reads():
    """orbax leaves a failed restore's reads unawaited: collect them here, not in a later test."""
    yield
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_saved_steps_are_the_complete_step_folders(tmp_path):
    for name in ("10", "20", "30.orbax-checkpoint-tmp-1", "5.damaged"):
        (tmp_path / name).mkdir()
    (tmp_path / "40").write_text("")  # a file, not a step folder
    assert ckpt_lib.saved_steps(str(tmp_path)) == [10, 20]
    assert ckpt_lib.Checkpointer(str(tmp_path), save_total_limit=0).steps() == [10, 20]
    assert ckpt_lib.saved_steps(str(tmp_path / "none")) == []


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_is_set_aside_and_the_previous_restores(checkpoints, damage, caplog,
                                                                abandoned_reads):
    harm, reason = DAMAGE[damage]
    harm(checkpoints / "20")
    checkpointer = ckpt_lib.Checkpointer(str(checkpoints), save_total_limit=1)
    with caplog.at_level(logging.WARNING, logger="simpo_jax.checkpoint"):
        step, state, meta = checkpointer.restore(abstract_state())
    assert (step, meta) == (10, {"step": 10})
    np.testing.assert_array_equal(state["big"], np.asarray(small_state()["big"]) + 10)
    warning = next(r.message for r in caplog.records if "Skipping checkpoint" in r.message)
    assert f"{checkpoints}/20: it is damaged on disk" in warning and reason in warning
    assert sorted(os.listdir(checkpoints)) == ["10", "20.damaged"]
    checkpointer.save(20, jax.tree.map(lambda x: x + 20, small_state()), {"step": 20})
    checkpointer.wait()  # the damaged copy neither blocks step 20 nor counts toward the limit
    assert sorted(os.listdir(checkpoints)) == ["20", "20.damaged"]
    assert checkpointer.restore(abstract_state())[0] == 20
    checkpointer.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_overwritten_bytes_never_restore(two_steps, tmp_path, caplog, abandoned_reads):
    """The issue's 1-64 overwritten bytes in ocdbt.process_0/d/*, at seeded random offsets.

    Bytes of array data set the step aside (a checksum mismatch, or a chunk that no longer
    decompresses). The small files beside the data hold process 0's own index, which orbax
    merges into state/d when it finalises the step and never reads again: bytes changed there
    leave the step intact, so it restores exactly.
    """
    rng = np.random.default_rng(26)
    saved = {s: np.asarray(small_state()["big"]) + s for s in (10, 20)}
    for trial in range(16):
        folder = tmp_path / str(trial)
        shutil.copytree(two_steps, folder)
        files = sorted(glob.glob(str(folder / "20" / "state" / "ocdbt.process_0" / "d" / "*")))
        data = data_file(folder / "20")
        path = data if trial % 4 else files[trial // 4 % len(files)]  # 3 in 4 trials hit data
        overwrite_random_bytes(path, rng)
        checkpointer = ckpt_lib.Checkpointer(str(folder), save_total_limit=0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="simpo_jax.checkpoint"):
            step, state, meta = checkpointer.restore(abstract_state())
        checkpointer.close()
        np.testing.assert_array_equal(state["big"], saved[step])
        assert meta == {"step": step}
        if path == data:
            assert step == 10, trial
            assert sorted(os.listdir(folder)) == ["10", "20.damaged"]
            assert any(f"{folder}/20: it is damaged on disk" in r.message for r in caplog.records)


def test_checksums_are_saved_in_the_meta_and_not_returned_with_it(two_steps):
    raw = json.loads((two_steps / "20" / "meta" / "metadata").read_text())
    assert raw["checksums"]["algorithm"] == ckpt_lib.checksum.ALGORITHM
    assert set(raw["checksums"]["arrays"]) == {"['big']", "['count']"}
    checkpointer = ckpt_lib.Checkpointer(str(two_steps), save_total_limit=0)
    assert checkpointer.read_meta(20) == {"step": 20}
    checkpointer.close()


def test_a_checkpoint_without_checksums_restores_with_a_note(tmp_path, caplog):
    import orbax.checkpoint as ocp

    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), save_total_limit=0)
    checkpointer.manager.save(10, args=ocp.args.Composite(  # as simpo_jax saved before checksums
        state=ocp.args.StandardSave(small_state()), meta=ocp.args.JsonSave({"step": 10})))
    checkpointer.wait()
    with caplog.at_level(logging.INFO, logger="simpo_jax.checkpoint"):
        step, state, meta = checkpointer.restore(abstract_state())
    checkpointer.close()
    assert (step, meta) == (10, {"step": 10})
    np.testing.assert_array_equal(state["big"], np.asarray(small_state()["big"]))
    notes = [r.message for r in caplog.records if "has no checksums" in r.message]
    assert len(notes) == 1 and "written before simpo_jax saved them" in notes[0]


def tensorstore_error(text):
    """An error as orbax raises it while reading an array: tensorstore's, wrapped."""
    error = Exception("Encountered error while reading array index: (slice(0, 32, 1),).")
    error.__cause__ = ValueError(text)
    return error


def while_handling(error, earlier):
    error.__context__ = earlier
    return error


STOPS = {
    "out of device memory": jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 256.00MiB."),
    "out of host memory": MemoryError(),
    "EIO from Python": OSError(errno.EIO, "Input/output error"),
    "EIO from tensorstore": tensorstore_error(  # as observed with read() failing with EIO
        'UNKNOWN: Error reading "big/0.0" in OCDBT database at local file "/c/20/state/": Failed '
        "to read 32768 bytes from file at offset 0: Input/output error [os_error_code='5']"),
    "ESTALE from tensorstore": tensorstore_error(
        'FAILED_PRECONDITION: Error reading "big/0.0": Failed to read 32768 bytes from file at '
        "offset 0: Stale file handle [os_error_code='116']"),
    "ESTALE from older tensorstore": tensorstore_error(
        'FAILED_PRECONDITION: Error reading local file "/c/20/state/d/1": [OS error 116: ESTALE '
        "Stale file handle]"),
    "EIO while handling a missing file": while_handling(
        OSError(errno.EIO, "Input/output error"), ValueError("NOT_FOUND: big/0.0")),
    "a network filesystem hiccup": tensorstore_error(
        'UNAVAILABLE: Error reading "big/0.0": DEADLINE_EXCEEDED'),
}


@pytest.mark.parametrize("failure", STOPS)
def test_a_failure_other_than_damage_stops_and_deletes_nothing(checkpoints, failure,
                                                               monkeypatch):
    checkpointer = ckpt_lib.Checkpointer(str(checkpoints), save_total_limit=1)
    read = checkpointer.manager.restore

    def failing_restore(step, args=None):
        if "state" in args:
            raise STOPS[failure]
        return read(step, args=args)

    monkeypatch.setattr(checkpointer.manager, "restore", failing_restore)
    with pytest.raises(RuntimeError, match=r"checkpoint .*/checkpoints/20 failed .*nothing was "
                                           "deleted") as raised:
        checkpointer.restore(abstract_state())
    assert raised.value.__cause__ is STOPS[failure]
    assert sorted(os.listdir(checkpoints)) == ["10", "20"]
    checkpointer.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_target_that_does_not_fit_stops(checkpoints, abandoned_reads):
    checkpointer = ckpt_lib.Checkpointer(str(checkpoints), save_total_limit=1)
    target = abstract_state()
    target["big"] = jax.ShapeDtypeStruct((128, 256), np.float32, sharding=target["big"].sharding)
    with pytest.raises(RuntimeError, match=r"/20 failed \(ValueError: Requested shape: \(128,"):
        checkpointer.restore(target)
    assert sorted(os.listdir(checkpoints)) == ["10", "20"]
    checkpointer.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoint_damaged_is_an_error_that_deletes_nothing(checkpoints, abandoned_reads):
    cut_short(data_file(checkpoints / "20"))
    (checkpoints / "10" / "meta" / "metadata").write_text("")
    checkpointer = ckpt_lib.Checkpointer(str(checkpoints), save_total_limit=1)
    with pytest.raises(UserError, match=r"Every checkpoint in .*checkpoints is damaged on disk "
                       r"\(20: .*OUT_OF_RANGE.*; 10: meta/metadata is not valid JSON\)\. Nothing "
                       "was deleted.*new output_dir.*resume_from"):
        checkpointer.restore(abstract_state())
    assert sorted(os.listdir(checkpoints)) == ["10", "20"]
    with pytest.raises(UserError, match=r"/10 is damaged on disk: meta/metadata"):
        checkpointer.restore(abstract_state(), step=10)  # an explicit step is never skipped
    checkpointer.close()
