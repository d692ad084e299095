"""Orbax checkpoints of the train state plus a JSON record of what produced them.

A checkpoint is written to a temporary directory and renamed when complete (orbax's atomic
finalisation), so a save interrupted by preemption is never listed. The meta holds a checksum of
every array (simpo_jax.checksum), finalised with the arrays. Restoring skips, with a warning, only
a checkpoint damaged on disk (a file missing, short or undecodable, or an array whose checksum no
longer matches); any other failure (an I/O error, out of memory, a target that does not fit) stops
the run, and so does damage to every one.
The data position is the step itself: the data order is a pure function of (seed, step).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
import tensorstore as ts

from simpo_jax import checksum
from simpo_jax.errors import UserError

log = logging.getLogger(__name__)

# tensorstore raises ValueError("<absl status code>: ...") and reports bytes that are missing,
# short or undecodable with these codes. INVALID_ARGUMENT, the one code it leaves unprefixed, is
# also how a target that does not fit reads, so it counts only while reading the index (no target).
# An OS error (EIO, ESTALE, ...) names its errno and is never damage, whatever its code.
DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION")
OS_ERROR_MARKERS = ("os_error_code=", "[OS error")
ARRAY_TYPES = ("jax.Array", "np.ndarray")  # tree_metadata value types stored as zarr arrays
CHECKSUMS = "checksums"  # the meta key of {"algorithm": ..., "arrays": {leaf path: checksum}}


def saved_steps(directory: str) -> list[int]:
    """The complete checkpoint steps in `directory` (<output_dir>/checkpoints), oldest first.

    Only os calls, so it is cheap: orbax writes a step as <step>.orbax-checkpoint-tmp-* and renames
    it when complete, and a damaged step is set aside as <step>.damaged; neither is a number.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


class Checkpointer:
    """Saves and restores {state, meta} under <output_dir>/checkpoints/<step>."""

    def __init__(self, directory: str, *, save_total_limit: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        # Rotation keeps the newest save_total_limit steps and, beyond them, the last step known to
        # be healthy (see `healthy_step`), so a run that goes bad never rotates out its last good
        # checkpoint.
        self.healthy_step = None
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(save_total_limit if save_total_limit > 0 else None),
            _KeepStep(lambda: self.healthy_step)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; `wait` or the next save blocks until it is complete.

        The checksums are computed on device first (every process takes part), so they describe
        exactly the arrays orbax then copies and writes in the background.
        """
        sums = {"algorithm": checksum.ALGORITHM, "arrays": checksum.checksums(state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, CHECKSUMS: sums})),
            force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return saved_steps(self.directory)

    def read_meta(self, step: int) -> dict:
        """The meta saved with `step`, without the checksums."""
        return self._read_meta(step)[0]

    def _read_meta(self, step: int) -> tuple[dict, dict | None]:
        """(meta as saved, {"algorithm", "arrays"} or None for a checkpoint without checksums)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        return meta, meta.pop(CHECKSUMS, None)

    def restore(self, abstract_state: Any, step: int | None = None,
                check: Callable[[int, dict], None] | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of `step`, else of the latest step not damaged on disk; None if none.

        Damaged newer steps are skipped with a warning and, once an older one restores, renamed to
        <step>.damaged, so later saves neither collide with them nor count them toward
        save_total_limit. Anything else raises, naming the checkpoint: another failure, damage to
        `step` or to every checkpoint. `abstract_state` holds jax.ShapeDtypeStruct leaves with the
        target shardings, so a checkpoint written on one mesh restores onto another.
        `check(step, meta)` runs before the state is read and raises when the checkpoint belongs to
        a different run.
        """
        if step is not None:
            loaded, reason = self._load(step, abstract_state, check)
            if reason:
                raise UserError(f"Checkpoint {self.directory}/{step} is damaged on disk: "
                                f"{reason}. Nothing was deleted; set config.resume_from to "
                                "another step folder.")
            return (step, *loaded)
        damaged = {}
        for s in reversed(self.steps()):
            loaded, reason = self._load(s, abstract_state, check)
            if reason:
                log.warning("Skipping checkpoint %s/%d: it is damaged on disk (%s).",
                            self.directory, s, reason)
                damaged[s] = reason
                continue
            self._set_aside(damaged)
            return (s, *loaded)
        if damaged:
            listed = "; ".join(f"{s}: {r}" for s, r in damaged.items())
            raise UserError(
                f"Every checkpoint in {self.directory} is damaged on disk ({listed}). Nothing was "
                "deleted. To start from the configured weights, move these step folders away or "
                "use a new output_dir; to resume from a copy elsewhere, set config.resume_from to "
                "its step folder.")
        return None

    def _load(self, step: int, abstract_state: Any, check) -> tuple[tuple[Any, dict] | None, str]:
        """((state, meta), "") or (None, why the checkpoint is damaged); other failures raise."""
        try:
            reason = self.damage_on_disk(step)
            meta, sums = (None, None) if reason else self._read_meta(step)
        except Exception as e:
            raise self._failed(step, e) from e
        if reason:
            return None, reason
        if check is not None:
            check(step, meta)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            if is_damage(e):
                return None, _summary(e)
            raise self._failed(step, e) from e
        reason = self._verify(step, state, sums)
        return (None, reason) if reason else ((state, meta), "")

    def _verify(self, step: int, state: Any, sums: dict | None) -> str:
        """Why the restored arrays differ from the ones saved, or "" (also when nothing to check)."""
        if sums is None or sums.get("algorithm") != checksum.ALGORITHM:
            log.info("Checkpoint %s/%d has no checksums of a kind this version knows (%s): "
                     "restored without verifying its arrays.", self.directory, step,
                     "written before simpo_jax saved them" if sums is None else sums.get("algorithm"))
            return ""
        saved, now = sums["arrays"], checksum.checksums(state)
        changed = [path for path, value in now.items() if saved.get(path) != value]
        if not changed:
            return ""
        return (f"{len(changed)} of its {len(now)} arrays do not match the checksums saved with "
                f"them ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")

    def damage_on_disk(self, step: int) -> str:
        """Why checkpoint `step` is damaged on disk, or "": reads metadata and index, not arrays.

        Damage: meta/metadata or state/_METADATA missing or not JSON, a state/array_metadatas file
        not JSON, state/ or its OCDBT manifest missing, an index that does not decode, an array
        state/_METADATA lists absent from the index. An I/O error other than a missing file raises.
        """
        folder = os.path.join(self.directory, str(step))
        _, reason = _read_json(folder, "meta/metadata")
        if reason:
            return reason
        state = os.path.join(folder, "state")
        if not os.path.isdir(state):
            return "state/ is missing"
        tree, reason = _read_json(folder, "state/_METADATA")  # the tree orbax restores into
        for name in sorted(_listdir(os.path.join(state, "array_metadatas"))):
            reason = reason or _read_json(folder, f"state/array_metadatas/{name}")[1]
        if reason:
            return reason
        tree = tree if isinstance(tree, dict) else {}
        has_manifest = os.path.exists(os.path.join(state, "manifest.ocdbt"))
        use_ocdbt = tree.get("use_ocdbt", has_manifest)
        if use_ocdbt and not has_manifest:
            return "state/manifest.ocdbt is missing"
        base = {"driver": "file", "path": state + "/"}
        try:
            keys = set(ts.KvStore.open({"driver": "ocdbt", "base": base} if use_ocdbt else base)
                       .result().list().result())
        except ValueError as e:
            if is_damage(e, index_only=True):
                return f"its array index does not read ({_summary(e)})"
            raise
        suffix = "zarr.json" if tree.get("use_zarr3") else ".zarray"
        try:
            arrays = [".".join(str(k["key"]) for k in entry["key_metadata"])
                      for entry in tree.get("tree_metadata", {}).values()
                      if entry.get("value_metadata", {}).get("value_type") in ARRAY_TYPES]
        except (AttributeError, KeyError, TypeError):  # a layout unknown here: leave it to orbax
            arrays = []
        missing = [a for a in arrays if f"{a}/{suffix}".encode() not in keys]
        if missing:
            return (f"{len(missing)} of the {len(arrays)} arrays in state/_METADATA are not in "
                    f"state/ ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        return ""

    def _failed(self, step: int, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"Restoring checkpoint {self.directory}/{step} failed ({_summary(error)}). This is not "
            "damage on disk (a file missing, short or undecodable) that could be skipped, so the "
            "run stops; nothing was deleted. Fix the cause (I/O, memory, a changed model or mesh) "
            "and rerun to resume from it.")

    def _set_aside(self, steps) -> None:
        """Renames damaged step folders to <step>.damaged, which orbax neither lists nor deletes."""
        if not steps:
            return
        barrier = f"simpo_jax_set_aside:{self.directory}:{sorted(steps)}"  # unique per process
        ocp.multihost.sync_global_processes(barrier + ":restored")  # no process still reads them
        if jax.process_index() == 0:
            for step in steps:
                folder = os.path.join(self.directory, str(step))
                target, n = folder + ".damaged", 1
                while os.path.exists(target):
                    n += 1
                    target = f"{folder}.damaged{n}"
                os.rename(folder, target)
                log.warning("Renamed damaged checkpoint %s to %s, so that saving step %d again "
                            "does not collide with it.", folder, target, step)
        ocp.multihost.sync_global_processes(barrier + ":renamed")
        self.manager.reload()

    def close(self) -> None:
        """Waits for saves in flight, then releases the manager; calling it again does nothing."""
        if self.manager is None:
            return
        self.manager.wait_until_finished()
        self.manager.close()
        self.manager = None

    def set_aside_from(self, step: int) -> list[str]:
        """Renames the steps >= `step` to <step>.unhealthy (after the saves in flight), so a rerun
        resumes from an earlier one; returns the new names. Nothing is deleted."""
        self.wait()
        moved = []
        barrier = f"simpo_jax_unhealthy:{self.directory}:{step}"
        ocp.multihost.sync_global_processes(barrier + ":saved")
        for s in (s for s in self.steps() if s >= step):
            folder = os.path.join(self.directory, str(s))
            target, n = folder + ".unhealthy", 1
            while os.path.exists(target):
                n += 1
                target = f"{folder}.unhealthy{n}"
            if jax.process_index() == 0:
                os.rename(folder, target)
            moved.append(target)
        ocp.multihost.sync_global_processes(barrier + ":renamed")
        self.manager.reload()
        return moved


class _KeepStep(ocp.checkpoint_managers.PreservationPolicy):
    """Preserves the one step `current()` names (None: none)."""

    def __init__(self, current: Callable[[], int | None]):
        self.current = current

    def should_preserve(self, checkpoints, *, context):
        keep = self.current()
        return [c.step == keep for c in checkpoints]


def is_damage(error: BaseException, *, index_only: bool = False) -> bool:
    """Whether `error`, or an error it was raised from, is tensorstore reporting damage on disk."""
    chain = _chain(error)
    if any(isinstance(e, (MemoryError, OSError)) and not isinstance(e, FileNotFoundError)
           or any(marker in str(e) for marker in OS_ERROR_MARKERS) for e in chain):
        return False
    for e in chain:
        if type(e) is ValueError:  # tensorstore's type; subclasses are orbax's and JAX's checks
            code = re.match(r"([A-Z_]+): ", str(e))
            code = code.group(1) if code else "INVALID_ARGUMENT"
            if code in DAMAGE_CODES or (index_only and code == "INVALID_ARGUMENT"):
                return True
    return False


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from (or while handling), outermost first."""
    chain = []
    while error is not None and all(error is not e for e in chain):
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _read_json(folder: str, name: str) -> tuple[Any, str]:
    """(content, "") or (None, why the file is missing or damaged)."""
    try:
        with open(os.path.join(folder, name), "rb") as f:
            return json.loads(f.read()), ""
    except (FileNotFoundError, NotADirectoryError):
        return None, f"{name} is missing"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None, f"{name} is not valid JSON"


def _listdir(folder: str) -> list[str]:
    """The names in `folder`; none when it does not exist (older orbax writes no such folder)."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _summary(error: BaseException) -> str:
    """The innermost error's type and first line, without tensorstore's spec dump."""
    error = _chain(error)[-1]
    text = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    return f"{type(error).__name__}: {text[:400]}"


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
