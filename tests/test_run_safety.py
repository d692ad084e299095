"""Nothing lost, nothing silent (issue 26): health stops, one run per output_dir, exit codes a
pipeline can trust, the signal guard over the whole run, reruns without duplicates, a full disk
in one line."""

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from simpo_jax import checkpoint as ckpt_lib
from simpo_jax import cli, health, run_folder, train
from simpo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN_V = math.log(512)  # the tiny models' vocabulary


def tiny_config(output_dir, **overrides):
    """test_resume's tiny config: 4 steps, each logged, no save or eval before the end."""
    from test_resume import tiny_config as short_config

    defaults = dict(max_steps=4, eval_steps=1000, save_steps=1000, save_total_limit=2,
                    logging_steps=1, num_samples=4, report_to=())
    return short_config(output_dir, **{**defaults, **overrides})


def run_py(*args, timeout=600):
    proc = subprocess.run([sys.executable, "run.py", "--config=configs/tiny.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    return proc.returncode, proc.stdout, proc.stderr


def rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- Health: the signs ---------------------------------------------------------------------------

# Rows of `--config.learning_rate=1e3` on the tiny default, as logged before this change.
HEALTHY = {"loss": 1.666, "grad_norm": 10.03, "rewards/accuracies": 0.5, "rewards/margins": -0.09,
           "logps/chosen": -1.69, "logps/rejected": -1.598}
BLOWN_UP = dict(HEALTHY, **{"loss": 4.0e5, "logps/chosen": -1.127e6, "logps/rejected": -1.026e6})
COLLAPSED = {"loss": 2.222, "grad_norm": 0.0, "rewards/accuracies": 0.0, "rewards/margins": 0.0,
             "logps/chosen": -6.238, "logps/rejected": -6.238}


def test_signs_of_an_unhealthy_run():
    assert health.signs(HEALTHY, LN_V) == []
    assert health.signs(dict(HEALTHY, **{"logps/rejected": -6.2}), LN_V) == []  # one side only
    assert "far below" in health.signs(BLOWN_UP, LN_V)[0]
    collapsed = health.signs(COLLAPSED, LN_V)
    assert len(collapsed) == 2 and "all 0" in collapsed[0] and "uniform" in collapsed[1]
    assert health.signs(dict(HEALTHY, loss=float("nan")), LN_V) == ["loss=nan not finite"]
    assert health.signs(dict(HEALTHY, grad_norm=float("inf")), LN_V) == ["grad_norm=inf not finite"]
    assert "uniform" in health.signs({"logps/chosen": -6.2385, "logps/rejected": -6.238}, LN_V,
                                     train=False)[0]


class FakeCheckpointer:
    directory = "/run/checkpoints"

    def __init__(self, steps):
        self.on_disk, self.healthy_step, self.set_aside = list(steps), None, None

    def steps(self):
        return list(self.on_disk)

    def set_aside_from(self, step):
        self.set_aside = [s for s in self.on_disk if s >= step]
        self.on_disk = [s for s in self.on_disk if s < step]
        return [f"{self.directory}/{s}.unhealthy" for s in self.set_aside]


def test_collapse_stops_after_patience_and_names_the_last_healthy_checkpoint():
    checkpointer = FakeCheckpointer([])
    watch = health.Health(checkpointer, 512, "lower learning_rate", patience=3)
    state = {"w": jax.numpy.ones(3)}
    for step in (1, 2):
        watch.observe(step, HEALTHY)
        assert watch.may_save(step, state)
        watch.saved_step(step)
        checkpointer.on_disk.append(step)
    watch.observe(3, BLOWN_UP)  # the state saved at step 2 gave these metrics
    assert checkpointer.healthy_step == 1 and not watch.may_save(3, state)
    watch.observe(4, COLLAPSED)
    with pytest.raises(health.RunUnhealthy) as stopped:
        watch.observe(5, COLLAPSED)
    assert checkpointer.set_aside == [2] and checkpointer.on_disk == [1]
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("Step 5: ") and "since step 3" in message
    assert "last healthy checkpoint is /run/checkpoints/1" in message
    assert "/run/checkpoints/2.unhealthy" in message and "Lower learning_rate." in message


def test_nan_stops_at_once_and_a_non_finite_state_is_never_saved():
    # A resume at learning_rate=1e30: step 11 runs on the restored state, its update blows up.
    watch = health.Health(FakeCheckpointer([10]), 512, "advice", start_step=10)
    watch.observe(11, HEALTHY)
    with pytest.raises(health.RunUnhealthy, match=r"^Step 12: loss=nan not finite\. .*"
                                                  r"checkpoints/10 \(kept"):
        watch.observe(12, dict(HEALTHY, loss=float("nan")))
    watch = health.Health(FakeCheckpointer([]), 512, "advice")
    with pytest.raises(health.RunUnhealthy, match="the state after step 3: a parameter or "
                                                  "optimizer value not finite.*No healthy"):
        watch.may_save(3, {"w": jax.numpy.array([1.0, np.inf])})
    watch = health.Health(FakeCheckpointer([]), 512, "advice")
    watch.observe(4, HEALTHY)
    with pytest.raises(health.RunUnhealthy, match="the eval of step 4: .*uniform"):
        watch.observe_eval(4, COLLAPSED)


def test_a_run_that_starts_uniform_is_not_stopped_for_it(caplog):
    """A freshly initialised model (model_init) is uniform at the eval of step 0 and for its first
    steps at a small learning rate: that is no collapse. Other signs still stop it."""
    uniform = dict(HEALTHY, **{"logps/chosen": -6.2383, "logps/rejected": -6.2380})
    watch = health.Health(FakeCheckpointer([]), 512, "advice")
    with caplog.at_level(logging.WARNING, logger="simpo_jax.health"):
        watch.observe_eval(0, uniform)
    assert "start at -ln V" in caplog.text
    for step in range(1, 2 * health.PATIENCE):
        watch.observe(step, uniform)
    with pytest.raises(health.RunUnhealthy, match="loss=nan not finite"):
        watch.observe(2 * health.PATIENCE, dict(uniform, loss=float("nan")))


def small_state(value):
    return {"w": jax.numpy.full((4,), float(value))}


def test_rotation_never_deletes_the_last_healthy_checkpoint(tmp_path):
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), save_total_limit=1)
    checkpointer.save(1, small_state(1), {})
    checkpointer.wait()
    checkpointer.healthy_step = 1
    for step in (2, 3):  # saved before anything vouched for them
        checkpointer.save(step, small_state(step), {})
        checkpointer.wait()
    assert checkpointer.steps() == [1, 3]
    checkpointer.healthy_step = 3
    checkpointer.save(4, small_state(4), {})
    checkpointer.wait()
    assert checkpointer.steps() == [3, 4]
    assert checkpointer.set_aside_from(4) == [f"{tmp_path}/4.unhealthy"]
    assert checkpointer.steps() == [3] and os.path.isdir(tmp_path / "4.unhealthy")
    checkpointer.close()


@pytest.mark.slow
def test_learning_rate_1e3_stops_nonzero_and_keeps_the_last_healthy_checkpoint(tmp_path):
    out = tmp_path / "lr1e3"
    code, stdout, stderr = run_py(f"--config.output_dir={out}", "--config.learning_rate=1e3",
                                  "--config.save_steps=1", "--config.save_total_limit=1",
                                  "--config.logging_steps=1", "--config.max_steps=40")
    assert code == cli.EXIT_UNHEALTHY, stdout[-2000:] + stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("run.py: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    named = errors[0].split("The last healthy checkpoint is ")[1].split(" ")[0]
    assert os.path.isdir(named) and named.startswith(str(out / "checkpoints"))
    assert int(os.path.basename(named)) < 10, errors[0]  # collapsed from step 7 (see above)
    assert [s for s in os.listdir(out / "checkpoints") if s.isdigit()] == [os.path.basename(named)]
    assert "uniform" in errors[0] and "Lower learning_rate" in errors[0]
    assert not os.path.exists(out / "config.json")  # nothing exported
    assert "learning_rate=1000 for a model of" in stderr  # the doctor's row under 0.5B


# --- One run per output_dir --------------------------------------------------------------------

HOLD = """
import sys, time
from simpo_jax import run_folder
run_folder.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_one_folder_is_refused_in_one_line(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            run_folder.acquire(str(tmp_path))
        message = str(refused.value)
        assert "\n" not in message and f"pid {holder.pid} on host " in message
        assert "in use by another run" in message and "run.lock" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file is taken over, with a note.
    record = json.loads((tmp_path / "run.lock").read_text())
    assert record["pid"] == holder.pid and record["host"] and record["started"]
    run_folder.acquire(str(tmp_path))
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    run_folder.release(str(tmp_path))
    assert not (tmp_path / "run.lock").exists()


def test_two_runs_on_one_folder_through_run_py(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, stdout, stderr = run_py(f"--config.output_dir={tmp_path}", "--config.max_steps=2")
    finally:
        holder.kill()
        holder.wait()
    assert code == cli.EXIT_USER_ERROR and stderr.count("\n") == 1, stderr[-2000:]
    assert stderr.startswith("run.py: error: config.output_dir=") and "in use" in stderr
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]  # nothing of the first run touched


@pytest.mark.parametrize("field", ["output_dir", "export_dir"])
def test_the_model_folder_is_refused_as_output(field):
    config = tiny_config("outputs/x")
    config.unlock()
    setattr(config, field, os.path.join(ROOT, "assets", "tiny_sft"))
    with pytest.raises(UserError, match=rf"^config\.{field}=.*is the folder of config\."
                                        "model_name_or_path='assets/tiny_sft': the export would "
                                        "overwrite"):
        cli.preflight(config, "train")


def test_overwrite_output_dir_moves_the_earlier_run_aside(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "5").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    run_folder.claim(tiny_config(out, overwrite_output_dir=True), fresh=True)
    try:
        assert sorted(os.listdir(out)) == ["run.lock"]
        (aside,) = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
        assert sorted(os.listdir(tmp_path / aside)) == ["checkpoints", "metrics.jsonl"]
        assert str(tmp_path / aside) in capsys.readouterr().out
    finally:
        run_folder.release(str(out))
    with pytest.raises(UserError, match="overwrite_output_dir=True with config.resume_from"):
        run_folder.claim(tiny_config(out, overwrite_output_dir=True, resume_from="x/1"),
                         fresh=True)


# --- Exit codes, the signal guard, reruns ------------------------------------------------------

def sigterm_at_final_eval(monkeypatch, total):
    from simpo_jax import evaluation

    real = evaluation.evaluate

    def evaluate(run, stop=None):
        if run.start_step <= total and stop is not None:  # the final eval (the only stoppable)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, stop)

    monkeypatch.setattr(evaluation, "evaluate", evaluate)


@pytest.mark.slow
def test_sigterm_during_final_eval_saves_and_a_rerun_finishes_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tiny_config(out)
    sigterm_at_final_eval(monkeypatch, 4)
    with pytest.raises(SystemExit) as stopped:
        cli.main(config, "train")
    assert stopped.value.code == cli.EXIT_PREEMPTED
    assert ("Stopped by SIGTERM during the final evaluation of step 4/4; checkpoint saved in "
            f"{out / 'checkpoints'}/4. Rerun" in capsys.readouterr().out)
    assert os.listdir(out / "checkpoints") == ["4"]  # complete: no tmp folder left
    assert not os.path.exists(out / "config.json") and not (out / "run.lock").exists()
    monkeypatch.undo()
    for _ in range(2):  # the rerun finishes; a rerun of the finished run repeats nothing
        final = cli.main(config, "train")
        assert [r["step"] for r in rows(out) if "eval_loss" in r] == [0, 4]
        samples = [json.loads(line)["step"] for line in open(out / "samples.jsonl")]
        assert samples == [0] * 4 + [4] * 4
        assert final["loss"] == rows(out)[-1]["eval_loss"]
        assert os.path.exists(out / "config.json")


@pytest.mark.slow
def test_export_of_an_unfinished_run_says_so_and_does_not_push(tmp_path, capsys, small_disk):
    out = tmp_path / "run"
    train.train(tiny_config(out, save_steps=2, save_total_limit=0))
    os.rename(out / "checkpoints" / "4", out / "checkpoints" / "4.elsewhere")  # as if stopped at 2
    with pytest.raises(UserError, match=r"checkpoint is step 2 of 4: the run did not finish, so "
                                        r"it is not pushed.*allow_partial_push=True"):
        train.export_checkpoint(tiny_config(out, push_to_hub=True, hub_model_id="me/m"))
    exported = train.export_checkpoint(tiny_config(out, export_dir=str(tmp_path / "e")))
    assert "Exported step 2 of 4 to" in capsys.readouterr().out
    assert os.path.exists(os.path.join(exported, "config.json"))
    # A full disk during the export: one line, exit status 74.
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (3 * 2**20 - 64 * 2**10))
    with pytest.raises(SystemExit) as failed:
        cli.main(tiny_config(out, export_dir=str(small_disk / "e")), "export")
    err = capsys.readouterr().err
    assert failed.value.code == cli.EXIT_DISK and err.count("\n") == 1, err
    assert err.startswith(f"run.py: error: no space left on the disk of {small_disk}")


def test_resume_with_a_changed_schedule_warns(caplog):
    class Run:
        config = tiny_config("x", learning_rate=1e-3, max_steps=8)
        total_steps, start_step = 8, 4
        restored_meta = {"schedule": {**train.schedule(
            type("R", (), {"config": tiny_config("x"), "total_steps": 4})), "total_steps": 4}}

    with caplog.at_level("WARNING"):
        train.warn_schedule_change(Run)
    (warning,) = [r.message for r in caplog.records if "changed learning-rate" in r.message]
    assert "learning_rate 0.0003 -> 0.001" in warning and "max_steps 4 -> 8" in warning
    assert "total_steps 4 -> 8" in warning and "warmup_ratio" not in warning


# --- A full or read-only disk, the transformers line -------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for the data report and metrics, not for two tiny checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_with_its_free_space(small_disk):
    try:
        with open(small_disk / "big", "wb") as f:
            f.write(b"\0" * (4 << 20))
    except OSError as e:
        error = e
    assert error.errno == errno.ENOSPC
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = ValueError('RESOURCE_EXHAUSTED: Failed writing "d/1": No space left on '
                                   "device [os_error_code=28]")
    for e in (error, wrapped):
        message = cli.disk_problem(e, str(small_disk))
        assert message.startswith(f"no space left on the disk of {small_disk} (0.0 MiB free)")
    assert cli.disk_problem(ValueError("NOT_FOUND: x"), str(small_disk)) is None
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        os.makedirs(small_disk / "export")
    except OSError as e:
        error = e
    assert cli.disk_problem(error, str(small_disk)) == (
        f"{small_disk} cannot be written (read-only file system); set config.output_dir (and "
        "config.export_dir) to a folder this user can write to.")


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line(small_disk):
    out = small_disk / "run"
    code, stdout, stderr = run_py(f"--config.output_dir={out}", "--config.max_steps=20",
                                  "--config.save_steps=5", "--config.save_total_limit=0")
    assert code == cli.EXIT_DISK, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and stderr.count("\n") <= 3, stderr[-3000:]
    assert f"run.py: error: no space left on the disk of {out} (" in stderr
    details = stderr.split("(details: ")[1].split(")")[0]  # run.log, or a temporary file when
    assert "No space left" in open(details).read()  # the disk had no room left for it


def test_no_pytorch_line_in_a_run():
    """transformers says "PyTorch was not found" where torch is missing: run.py silences it."""
    hide_torch = ("import importlib.util as u, runpy, sys; f = u.find_spec; "
                  "u.find_spec = lambda n, *a, **k: None if n == 'torch' else f(n, *a, **k); "
                  "sys.argv = ['run.py', '--help']; runpy.run_path('run.py', run_name='not_main'); "
                  "import transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    proc = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stdout + proc.stderr
    shown = subprocess.run([sys.executable, "-c", hide_torch.replace(
        "runpy.run_path('run.py', run_name='not_main'); ", "")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "PyTorch was not found" in shown.stderr  # the line this guards against
