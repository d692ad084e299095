"""Metric sinks and the progress display."""

import io
import json
import os
import struct

import pytest

from simpo_jax import report


class Terminal(io.StringIO):
    def isatty(self):
        return True


def events(directory):
    """Event protos from TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    for name in os.listdir(directory):
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4


def read_events(directory):
    """Scalars from TensorBoard event files."""
    scalars = {}
    for event in events(directory):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_and_tensorboard(tmp_path):
    w = report.MetricsWriter(str(tmp_path), 100, report_to=("tensorboard",), stream=io.StringIO())
    w.write(10, {"loss": 0.5, "rewards/accuracies": 0.75})
    w.write(10, {"loss": 0.6}, prefix="eval_")
    w.write(20, {"loss": float("nan")})
    w.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 10, "loss": 0.5, "rewards/accuracies": 0.75},
                    {"step": 10, "eval_loss": 0.6}, {"step": 20, "loss": "nan"}]
    scalars = read_events(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(10, 0.5)]
    assert scalars["eval/loss"] == [(10, pytest.approx(0.6))]
    assert scalars["train/rewards/accuracies"] == [(10, 0.75)]


def test_progress_line_on_a_terminal_plain_lines_otherwise(tmp_path):
    tty = Terminal()
    w = report.MetricsWriter(str(tmp_path / "a"), 10, stream=tty)
    os.makedirs(tmp_path / "a")
    for step in range(1, 4):
        w.progress(step, {"loss": 0.5, "rewards/accuracies": 0.5, "tokens_per_second": 100.0})
    out = tty.getvalue()
    assert out.count("\r") == 3 and "step 3/10" in out and "eta=" in out and "[" in out
    assert "\n" not in out

    plain = io.StringIO()
    os.makedirs(tmp_path / "b")
    w = report.MetricsWriter(str(tmp_path / "b"), 10, stream=plain)
    for step in range(1, 4):
        w.progress(step, {"loss": 0.5})
    assert plain.getvalue() == ""
    w.write(3, {"loss": 0.5, "rewards/accuracies": 0.5})
    assert plain.getvalue().count("\n") == 1 and "train step 3/10" in plain.getvalue()


def test_unknown_sink_is_named(tmp_path):
    with pytest.raises(ValueError, match="mlflow"):
        report.MetricsWriter(str(tmp_path), 10, report_to=("mlflow",))


def test_resume_drops_rows_logged_after_the_start_step(tmp_path):
    rows = [{"step": 0, "eval_loss": 1.0}, {"step": 5, "loss": 0.9}, {"step": 10, "loss": 0.8},
            {"step": 10, "eval_loss": 0.7}, {"step": 15, "loss": 0.6}, {"step": 20, "loss": 0.5},
            {"step": 20, "eval_loss": 0.4}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 25, "lo')  # cut short
    w = report.MetricsWriter(str(tmp_path), 20, report_to=("tensorboard",), stream=io.StringIO(),
                             start_step=10)
    assert [json.loads(line) for line in open(path)] == rows[:4]
    w.write(15, {"loss": 0.65})
    w.write(20, {"loss": 0.55})
    w.write(20, {"loss": 0.45}, prefix="eval_")
    w.close()
    got = [json.loads(line) for line in open(path)]
    assert sorted((r["step"], "eval_loss" in r) for r in got) == [
        (0, True), (5, False), (10, False), (10, True), (15, False), (20, False), (20, True)]
    assert got[4:] == [{"step": 15, "loss": 0.65}, {"step": 20, "loss": 0.55},
                       {"step": 20, "eval_loss": 0.45}]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]  # no temp file left
    # A session start at step 11 makes TensorBoard discard earlier runs' events from there on.
    purges = [e.step for e in events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert purges == [11]

    report.MetricsWriter(str(tmp_path), 20, stream=io.StringIO())  # --mode=eval: no start step
    assert [json.loads(line) for line in open(path)] == got
    report.MetricsWriter(str(tmp_path), 20, stream=io.StringIO(), start_step=0)  # a fresh run
    assert path.read_text() == ""


def test_eval_results_written_and_read_back(tmp_path):
    assert report.read_eval_results(str(tmp_path)) is None
    report.write_eval_results(str(tmp_path), {"eval_loss": 0.5, "eval_rewards/accuracies": 1.0})
    assert report.read_eval_results(str(tmp_path)) == {"eval_loss": 0.5,
                                                       "eval_rewards/accuracies": 1.0}
    assert os.listdir(tmp_path) == ["eval_results.json"]
