"""Orbax checkpoints of the train state plus a JSON record of what produced them.

A checkpoint is written to a temporary directory and renamed when complete (orbax's atomic
finalisation), so a save interrupted by preemption is never listed. A finalised step whose files
were damaged later fails to restore and is skipped with a warning in favour of the previous one.
The data position is the step itself: the data order is a pure function of (seed, step).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores {state, meta} under <output_dir>/checkpoints/<step>."""

    def __init__(self, directory: str, *, save_total_limit: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=save_total_limit if save_total_limit > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; `wait` or the next save blocks until it is complete."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: int | None = None,
                check: Callable[[int, dict], None] | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of `step`, or of the latest step that restores; None if none does.

        `abstract_state` holds jax.ShapeDtypeStruct leaves with the target shardings, so a checkpoint
        written on one mesh restores onto another. `check(step, meta)` runs before the state is read
        and raises when the checkpoint belongs to a different run; that error is never swallowed.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        for s in candidates:
            try:
                meta = self.read_meta(s)
            except Exception as e:
                if step is not None:
                    raise
                self._skip(s, e)
                continue
            if check is not None:
                check(s, meta)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except Exception as e:  # damaged: report, fall back to an older one
                if step is not None:
                    raise
                self._skip(s, e)
                continue
            return s, restored["state"], meta
        return None

    def _skip(self, step: int, error: Exception) -> None:
        log.warning("Skipping checkpoint %s/%d: it does not restore (%s: %s).", self.directory, step,
                    type(error).__name__, (str(error).splitlines() or [""])[0][:300])

    def close(self) -> None:
        """Waits for saves in flight, then releases the manager; calling it again does nothing."""
        if self.manager is None:
            return
        self.manager.wait_until_finished()
        self.manager.close()
        self.manager = None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class PreemptionGuard:
    """SIGTERM/SIGINT ask the loop to finish its step, save and exit cleanly.

    Multi-process runs agree on the step through JAX's preemption sync point (the coordination
    service catches SIGTERM on every host), so every host saves the same step.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "preemption notice"
            except Exception:  # no preemption service in this runtime: fall back to the flag
                flags = multihost_utils.process_allgather(
                    np.asarray([self.signal_name is not None]))
                if np.any(flags):
                    self.signal_name = self.signal_name or "a signal on another host"
        return self.signal_name is not None
