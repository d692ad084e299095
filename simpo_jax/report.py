"""Metric sinks (metrics.jsonl, TensorBoard, Weights & Biases), eval_results.json, and the progress
display.

Only process 0 writes. On a terminal the progress is one updating line (steps, ETA, loss, reward
accuracy, tokens/s); otherwise it is a plain line every `logging_steps`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax

from simpo_jax.config.choices import ReportSink
from simpo_jax.paths import RunDir

log = logging.getLogger(__name__)
SINKS = ReportSink.values()


class MetricsWriter:
    """Appends one JSON object per logged row to <output_dir>/metrics.jsonl, mirrors it to the
    chosen sinks, and shows progress.

    A run that starts at `start_step` (0 for a fresh one, the restored step on resume) first drops
    the rows logged after that step by an earlier run, so each step keeps one train and one eval
    row; the default None (e.g. --mode=eval) leaves metrics.jsonl as it is.
    """

    def __init__(self, output_dir: str, total_steps: int, report_to=(), run_config=None,
                 stream=None, start_step: int | None = None):
        self.path = RunDir(output_dir).metrics
        self.total_steps = total_steps
        self.start = time.time()
        self.enabled = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tensorboard = self.wandb = None
        self._start_step = None
        if not self.enabled:
            return
        unknown = [s for s in report_to if s not in SINKS]
        if unknown:
            raise ValueError(f"config.report_to={list(report_to)}: unknown sink(s) {unknown}; valid: "
                             f"{list(SINKS)} (metrics.jsonl is always written).")
        if start_step is not None:
            keep_rows_until(self.path, start_step)
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides events an earlier run logged from that step on.
            purge = None if start_step is None else start_step + 1 if start_step else 0
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                             purge_step=purge)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                log.warning("report_to includes 'wandb' but wandb is not installed (pip install "
                            "wandb); continuing with the other sinks.")
            else:
                self.wandb = wandb.init(dir=output_dir, config=run_config and run_config.to_dict(),
                                        name=os.path.basename(os.path.abspath(output_dir)))

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        row = {"step": int(step)}
        row.update({prefix + k: _py(v) for k, v in metrics.items()})
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    tag = ("eval/" + k[len("eval_"):]) if k.startswith("eval_") else "train/" + k
                    self.tensorboard.add_scalar(tag, v, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if prefix or not self.tty:
            self._clear_line()
            print(self._line(step, row, prefix), file=self.stream, flush=True)

    def progress(self, step: int, metrics: dict | None) -> None:
        """On a terminal: redraw the progress line after every step."""
        if self._start_step is None:
            self._start_step, self.start = step - 1, time.time()
        if not (self.enabled and self.tty):
            return
        row = {"step": step, **({k: _py(v) for k, v in metrics.items()} if metrics else {})}
        self.stream.write("\r" + self._bar(step) + " " + self._line(step, row, "", short=True)
                          + "\033[K")
        self.stream.flush()

    def write_samples(self, step: int, samples: list[dict]) -> None:
        if self.enabled and self.tensorboard is not None and samples:
            text = "\n\n".join(f"**prompt:** {s['prompt']}\n\n**completion:** {s['completion']}"
                               for s in samples)
            self.tensorboard.add_text("samples", text, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._clear_line()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.wandb is not None:
                self.wandb.finish()
            self.tensorboard = self.wandb = None  # closing twice does nothing more

    def _clear_line(self):
        if self.tty:
            self.stream.write("\r\033[K")

    def _bar(self, step: int, width: int = 20) -> str:
        done = int(width * step / max(self.total_steps, 1))
        return "[" + "#" * done + "." * (width - done) + "]"

    def _eta(self, step: int) -> float:
        if self._start_step is None or step <= self._start_step:
            return float("nan")
        per_step = (time.time() - self.start) / (step - self._start_step)
        return per_step * (self.total_steps - step)

    def _line(self, step, row, prefix, short=False):
        keys = ["loss", "rewards/accuracies"]
        if not short:
            keys += ["rewards/margins", "logps/chosen", "logps/rejected"]
        if not prefix:
            keys += ["tokens_per_second"] if short else ["learning_rate", "grad_norm",
                                                         "tokens_per_second", "mfu"]
        parts = [f"{prefix or 'train '}step {step}/{self.total_steps}"]
        for k in keys:
            v = row.get(prefix + k)
            if isinstance(v, float):
                parts.append(f"{k.split('/')[-1]}={v:.4g}")
        if not prefix:
            parts.append(f"eta={_duration(self._eta(step))}")
        return " | ".join(parts)


def keep_rows_until(path: str, start_step: int) -> None:
    """Atomically rewrites a JSON-lines file keeping the rows with step <= start_step.

    The rows of `start_step` itself stay (a resumed run logs from the next step on); a fresh run
    (start_step 0) keeps none, as it evaluates step 0 again. Unreadable lines are dropped.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # e.g. a line cut short by a crash
            continue
        if start_step > 0 and isinstance(step, (int, float)) and step <= start_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("%s: dropped %d rows logged after step %d by an earlier run.", path,
             len(lines) - len(kept), start_step)


def write_eval_results(output_dir: str, metrics: dict) -> None:
    """eval_results.json: the final (or latest evaluated) metrics, which the model card reports."""
    with open(RunDir(output_dir).eval_results, "w") as f:
        json.dump(metrics, f, indent=2)


def read_eval_results(output_dir: str) -> dict | None:
    """The metrics of eval_results.json, or None when the run has none."""
    path = RunDir(output_dir).eval_results
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _py(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
