"""The device feed: this process's numpy batches -> global sharded jax.Arrays, built ahead of the loop."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np


def to_global(batch, shardings):
    """This process's rows of the global batch -> global jax.Arrays sharded over data x fsdp.

    batch and shardings: the same typed batch, of numpy arrays and of NamedShardings.
    """
    def one(local, sharding):
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(one, batch, shardings)


class prefetch:
    """Global device batches built by a background thread, `depth` steps ahead of the loop.

    Use as a context manager (or call close()): the thread is stopped and joined before the
    process exits, never left inside a JAX call at interpreter shutdown.
    """

    def __init__(self, batches, shardings: dict, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batches, shardings),
                                        daemon=True)
        self._thread.start()

    def _produce(self, batches, shardings):
        try:
            for batch in batches:
                item = to_global(batch, shardings)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Exception as e:  # surfaced in the training thread
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
