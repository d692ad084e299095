"""Where things are: the repository root, the one rule that resolves a local path, a run's files."""

from __future__ import annotations

import dataclasses
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO_ROOT, "assets")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


def resolve_local(path: str) -> str | None:
    """An existing local path: as given, against the current directory, then the repository root."""
    if not path:
        return None
    for candidate in (path, os.path.join(os.getcwd(), path), os.path.join(REPO_ROOT, path)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return None


def looks_local(path: str) -> bool:
    """Whether `path` can only be a local path (never a Hub repo id)."""
    return (path.startswith(("/", "./", "../", "~")) or path.endswith(FILE_EXTENSIONS)
            or os.sep + os.sep in path or path.count("/") > 1)


def _run_file(name: str) -> property:
    return property(lambda run_dir: run_dir.file(name), doc=f"<output_dir>/{name}")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run folder (output_dir); every module names them through this."""

    root: str

    def file(self, name: str) -> str:
        return os.path.join(self.root, name)

    checkpoints = _run_file("checkpoints")
    metrics = _run_file("metrics.jsonl")
    eval_results = _run_file("eval_results.json")
    samples = _run_file("samples.jsonl")
    data_report = _run_file("data_report.json")
