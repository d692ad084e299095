"""Metric sinks and progress lines; only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax


class MetricsWriter:
    """Appends one JSON object per logged row to <output_dir>/metrics.jsonl and prints a line."""

    def __init__(self, output_dir: str, total_steps: int):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self.start = time.time()
        self.enabled = jax.process_index() == 0

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        row = {"step": int(step)}
        row.update({prefix + k: _py(v) for k, v in metrics.items()})
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(self._line(step, row, prefix), file=sys.stdout, flush=True)

    def _line(self, step, row, prefix):
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total_steps - step) if step else float("nan")
        keys = ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
        if not prefix:
            keys += ["learning_rate", "grad_norm", "tokens_per_second"]
        parts = [f"{prefix or 'train '}step {step}/{self.total_steps}"]
        for k in keys:
            v = row.get(prefix + k)
            if v is not None:
                parts.append(f"{k.split('/')[-1] if '/' in k else k}={v:.4g}")
        if not prefix and step:
            parts.append(f"eta={_duration(eta)}")
        return " | ".join(parts)


def _py(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
