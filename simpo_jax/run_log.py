"""<output_dir>/run.log: the whole log of a run, and the details a one-line failure leaves out.

The console keeps the run's own lines. Errors that orbax's and tensorstore's background threads
print while a save fails (a full disk: hundreds of lines, dozens of tracebacks, all about the one
cause that run.py then states in one line) go to run.log only.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from simpo_jax import paths, run_folder

BACKGROUND = "simpo_jax.background"  # the logger of exceptions raised in background threads


def log_name(process_id: int) -> str:
    return "run.log" if process_id <= 0 else f"run.process_{process_id}.log"


class _RunLogHandler(logging.FileHandler):
    """Opens the file at the first record once output_dir exists; a full or read-only disk drops
    records instead of printing logging's own tracebacks."""

    def __init__(self, path: str, process_id: int):
        super().__init__(path, delay=True)
        self.process_id = process_id

    def emit(self, record):
        # Only once this run holds output_dir (process 0 locks it): a run refused there writes
        # nothing into the folder of the run that holds it.
        if self.stream is None and not (self.process_id > 0 and os.path.isdir(
                os.path.dirname(self.baseFilename)) or run_folder.claimed(
                os.path.dirname(self.baseFilename))):
            return
        super().emit(record)

    def handleError(self, record):
        pass


class _NotBackgroundNoise(logging.Filter):
    def filter(self, record):
        return not (record.name == BACKGROUND or (record.levelno >= logging.ERROR
                                                  and f"{os.sep}orbax{os.sep}" in record.pathname))


def start(output_dir: str, process_id: int = 0) -> str:
    """Mirrors the log to <output_dir>/run.log, keeps background-thread noise off the console."""
    path = paths.RunDir(output_dir).file(log_name(process_id))
    root = logging.getLogger()
    if any(isinstance(h, _RunLogHandler) and h.baseFilename == os.path.abspath(path)
           for h in root.handlers):
        return path
    for handler in root.handlers:
        handler.addFilter(_NotBackgroundNoise())
    handler = _RunLogHandler(path, process_id)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    _route_background_exceptions()
    return path


def _route_background_exceptions() -> None:
    """Exceptions that end a background thread, or that Python prints from a callback as
    unraisable, go to the BACKGROUND logger; the main thread's keep the usual traceback."""
    background = logging.getLogger(BACKGROUND)

    def thread_hook(args):
        background.error("Exception in thread %s", getattr(args.thread, "name", "?"),
                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable_hook(args):
        background.error("Exception ignored in %r: %s", args.object, args.err_msg or "",
                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    previous = sys.excepthook

    def except_hook(exc_type, value, tb):
        if threading.current_thread() is threading.main_thread():
            previous(exc_type, value, tb)
        else:
            background.error("Exception in a background callback", exc_info=(exc_type, value, tb))

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook
    sys.excepthook = except_hook
