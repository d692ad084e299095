"""SIGTERM/SIGINT: the run finishes its step (or cuts its final eval short), saves and exits with
its own exit code; the same decision on every process of a multi-process run."""

from __future__ import annotations

import functools
import signal
from typing import Callable

import jax
import numpy as np


class PreemptionGuard:
    """SIGTERM/SIGINT ask the loop to finish its step, save and exit cleanly.

    Every process must stop after the same step: one that stops alone enters the collective save
    while the others enter the next train step, and all of them wait forever. So in a
    multi-process run every step all-gathers each process's signal (one int on one device a
    process), and each process reads that result one step later, when the train step it was
    queued behind has finished anyway: all read the same signals and stop after the same step,
    for one tiny collective a step and no wait. JAX's preemption sync point is not used: it hears
    SIGTERM through a C handler that any Python handler replaces, and never hears SIGINT.
    """

    def __init__(self):
        self.signal_name = None  # what stopped the run, once every process agrees
        self.received = 0  # the signal this process received, 0 if none
        self._previous = {}
        self._in_flight = None  # the all-gathered signals of the last step, not read yet

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
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`: the same answer on every process."""
        if jax.process_count() == 1:
            if self.received:
                self.signal_name = signal.Signals(self.received).name
            return self.signal_name is not None
        agreed, self._in_flight = self._in_flight, _gather_per_process(self.received)
        return agreed is not None and self._agreed(agreed)

    def agree(self) -> bool:
        """Whether any process received a signal, asked now: outside the step loop (after the final
        eval, before the export), where every process calls it at the same point."""
        if jax.process_count() == 1:
            return self.should_stop(0)
        return self._agreed(_gather_per_process(self.received))

    def interrupted(self) -> bool:
        """Whether to cut short what runs now (an eval): single-process runs only, as processes
        that stopped at different batches would wait for each other forever."""
        return jax.process_count() == 1 and self.should_stop(0)

    def _agreed(self, gathered: jax.Array) -> bool:
        signals = np.asarray(gathered.addressable_data(0))  # one per process, 0 for none
        if not signals.any():
            return False
        first = int(np.flatnonzero(signals)[0])
        self.signal_name = f"{signal.Signals(int(signals[first])).name} on process {first}"
        return True


def _gather_per_process(value: int) -> jax.Array:
    """Dispatches an all-gather of one int per process; reading the result waits for it."""
    per_process, gather = _all_gather()
    (device,) = per_process.addressable_devices
    return gather(jax.make_array_from_single_device_arrays(
        (jax.process_count(),), per_process,
        [jax.device_put(np.array([value], np.int32), device)]))


@functools.cache
def _all_gather() -> tuple[jax.sharding.NamedSharding, Callable[[jax.Array], jax.Array]]:
    """(one row per process on its first device, a jitted copy of such rows to all of them).

    One device a process: the fewest parties to the collective, so the least it costs.
    """
    first = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        first.setdefault(d.process_index, d)
    mesh = jax.sharding.Mesh(np.array(list(first.values())), ("process",),
                             axis_types=(jax.sharding.AxisType.Explicit,))
    return jax.sharding.NamedSharding(mesh, jax.P("process")), jax.jit(
        lambda x: x, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))
