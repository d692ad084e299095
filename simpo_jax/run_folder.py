"""One run per output_dir: an exclusive lock, no run inside the model's own folder, and
overwrite_output_dir (the earlier run moved aside, never deleted).

The lock is `<output_dir>/run.lock`, held with flock(2) by process 0 of a run (the other processes
of a multi-process run write only through process 0 or into the checkpoint process 0 coordinates,
so one lock a run suffices). It names the holder's host, pid and start time. The kernel drops a
flock when its process dies, so a lock file left by a dead process on this host is taken over with
a note; one that names a live process is refused with one line.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time

from simpo_jax import paths
from simpo_jax.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
_held: dict[str, int] = {}  # realpath of output_dir -> the open file descriptor holding its lock
_claimed: set[str] = set()  # every output_dir this process has locked (the run's own folders)


def claim(config, *, fresh: bool = False) -> None:
    """Process 0 takes output_dir's lock and, for a fresh training run with
    overwrite_output_dir, moves the earlier run aside; the other processes wait for it."""
    import jax

    if fresh and config.overwrite_output_dir and config.resume_from:
        raise UserError(f"config.overwrite_output_dir=True with config.resume_from="
                        f"{config.resume_from!r}: the first starts afresh, the second resumes; "
                        "set one.")
    if jax.process_index() == 0:
        acquire(config.output_dir)
        if fresh and config.overwrite_output_dir:
            move_aside(config.output_dir)
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes(f"simpo_jax_claim:{os.path.abspath(config.output_dir)}")


def lock_path(output_dir: str) -> str:
    return paths.RunDir(output_dir).file(LOCK_NAME)


def acquire(output_dir: str) -> None:
    """Takes output_dir's lock for this process (again: nothing), or raises a one-line UserError."""
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    path = lock_path(output_dir)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"config.output_dir={output_dir!r} is in use by another run "
                            f"({holder}; {path}). Wait for it to finish, stop it, or give this run "
                            "another output_dir.") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # released and removed between our open and our flock
            same_file = False
        if same_file:
            break
        os.close(fd)
    earlier = _read(fd)
    if earlier:
        log.warning("Took over the lock on %s from %s: that process is gone (a run that stopped "
                    "without releasing it).", output_dir, _describe(earlier))
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "started_unix": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = fd
    _claimed.add(key)


def claimed(output_dir: str) -> bool:
    """Whether this process has held output_dir's lock: only then does it write its run.log."""
    return os.path.realpath(output_dir) in _claimed


def release(output_dir: str) -> None:
    """Removes the lock file and drops the lock, if this process holds it."""
    fd = _held.pop(os.path.realpath(output_dir), None)
    if fd is None:
        return
    try:
        os.unlink(lock_path(output_dir))
    except OSError:  # the folder was moved or is read-only now: the flock still goes with fd
        pass
    os.close(fd)


def release_all() -> None:
    for key in list(_held):
        release(key)


def _read(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict) -> str:
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started "
            f"{record.get('started', '?')}")


def _holder(fd: int) -> str:
    record = _read(fd)
    return _describe(record) if record else "a process whose details are not written yet"


def check_not_model_folder(config) -> None:
    """output_dir or export_dir must not be model_name_or_path's own folder: the export would
    overwrite the base weights."""
    model = paths.resolve_local(config.model_name_or_path)
    if model is None or not os.path.isdir(model):
        return
    for field in ("output_dir", "export_dir"):
        value = getattr(config, field)
        if value and os.path.realpath(value) == os.path.realpath(model):
            raise UserError(f"config.{field}={value!r} is the folder of "
                            f"config.model_name_or_path={config.model_name_or_path!r}: the export "
                            "would overwrite the base model's weights. Give another folder.")


def move_aside(output_dir: str) -> str | None:
    """overwrite_output_dir: moves the earlier run's files (all but the lock) into a new sibling
    folder <output_dir>.old-<time>; returns it, or None when there was nothing to move."""
    names = [n for n in os.listdir(output_dir) if n != LOCK_NAME]
    if not names:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target, n = f"{os.path.abspath(output_dir).rstrip(os.sep)}.old-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{os.path.abspath(output_dir).rstrip(os.sep)}.old-{stamp}-{n}"
    os.makedirs(target)
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    print(f"overwrite_output_dir=True: moved the earlier run in {output_dir} to {target}; "
          "starting afresh.", flush=True)
    return target
