"""A run's checkpoints: exact resume, damage found by a run, export, eval and push of a step,
mesh and model changes, preemption."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from simpo_jax import build, cli, preemption, train
from simpo_jax.errors import UserError
from test_checkpoint import data_file, garble, overwrite_random_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(output_dir, **overrides):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    c.output_dir = str(output_dir)
    c.per_device_train_batch_size = 2  # x 8 forced CPU devices = the tiny default's 16 pairs
    c.per_device_eval_batch_size = 8
    c.max_steps = 20
    c.eval_steps = 1000
    c.save_steps = 10
    c.save_total_limit = 0
    c.logging_steps = 5
    c.export_dtype = "float32"
    for k, v in overrides.items():
        setattr(c, k, v)
    c.lock()
    return c


def train_rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def eval_steps(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "eval_loss" in r]


def final_params(output_dir, **overrides):
    run = build.build(tiny_config(output_dir, **overrides), with_data=False)
    run.checkpointer.close()
    return jax.tree.map(np.asarray, run.state.params), run.start_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train.train(tiny_config(out, eval_steps=10))
    return out


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    shutil.copy(uninterrupted / "metrics.jsonl", out / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints" / "20")  # as if the run had stopped after logging step 20
    train.train(tiny_config(out, eval_steps=10))
    ref, got = train_rows(uninterrupted), train_rows(out)
    assert [r["step"] for r in got] == [5, 10, 15, 20]  # one row per step, none twice
    assert eval_steps(out) == eval_steps(uninterrupted) == [0, 10, 20]
    for r_ref, r in zip(ref, got):
        for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
            assert r[k] == pytest.approx(r_ref[k], abs=1e-6), (r["step"], k)
    a, step_a = final_params(uninterrupted)
    b, step_b = final_params(out)
    assert step_a == step_b == 20
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


@pytest.mark.slow
def test_damaged_checkpoint_is_skipped_with_warning(uninterrupted, tmp_path, caplog):
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    state_dir = out / "checkpoints" / "20" / "state"
    for name in os.listdir(state_dir):  # truncate the newest checkpoint's files
        path = state_dir / name
        if path.is_file():
            path.write_bytes(b"")
        else:
            shutil.rmtree(path)
    with caplog.at_level("WARNING"):
        params, step = final_params(out)
    assert step == 10
    assert any("Skipping checkpoint" in r.message for r in caplog.records)
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20.damaged"]


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_instead_of_starting_over(uninterrupted, tmp_path):
    out = tmp_path / "all_damaged"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    for step in ("10", "20"):
        (out / "checkpoints" / step / "state" / "_METADATA").write_text("")
    with pytest.raises(UserError, match="Every checkpoint in .* is damaged on disk"):
        build.build(tiny_config(out), with_data=False)
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_line_from_run_py(uninterrupted, tmp_path, capsys):
    from simpo_jax import cli

    out = tmp_path / "all_damaged"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    overwrite_random_bytes(data_file(out / "checkpoints" / "20"), np.random.default_rng(3))
    garble(out / "checkpoints" / "10" / "state" / "array_metadatas" / "process_0")
    with pytest.raises(SystemExit) as exited:
        cli.main(tiny_config(out), "export")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("run.py: error:")]
    assert f"Every checkpoint in {out / 'checkpoints'} is damaged on disk (20: " in line
    assert "checksums" in line and "array_metadatas/process_0 is not valid JSON" in line
    assert "new output_dir" in line and "Traceback" not in err
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]


@pytest.mark.slow
def test_export_and_eval_of_a_damaged_latest_step_use_the_previous(uninterrupted, tmp_path,
                                                                    capsys, caplog):
    """Export and eval restore as a resume does: the damaged step is set aside, named in a
    warning, and the step they name in their own output is the previous one."""
    from simpo_jax import evaluation

    exported = tmp_path / "export_run"
    shutil.copytree(uninterrupted / "checkpoints", exported / "checkpoints")
    overwrite_random_bytes(data_file(exported / "checkpoints" / "20"), np.random.default_rng(4))
    with caplog.at_level(logging.WARNING, logger="simpo_jax.checkpoint"):
        train.export_checkpoint(tiny_config(exported, export_dir=str(tmp_path / "hf")))
    assert f"Exported step 10 of 20 to {tmp_path / 'hf'}" in capsys.readouterr().out
    assert any("20: it is damaged on disk" in r.message and "checksums" in r.message
               for r in caplog.records)
    assert sorted(os.listdir(exported / "checkpoints")) == ["10", "20.damaged"]

    evaluated = tmp_path / "eval_run"  # item 13 on the real train state
    shutil.copytree(uninterrupted / "checkpoints", evaluated / "checkpoints")
    os.remove(evaluated / "checkpoints" / "20" / "state" / "_METADATA")
    evaluation.evaluate_checkpoint(tiny_config(evaluated))
    assert f"eval of checkpoint {evaluated / 'checkpoints'}/10" in capsys.readouterr().out
    assert sorted(os.listdir(evaluated / "checkpoints")) == ["10", "20.damaged"]


@pytest.mark.slow
def test_restore_onto_a_different_mesh(uninterrupted):
    a, _ = final_params(uninterrupted)
    b, step = final_params(uninterrupted, mesh_data=2, mesh_fsdp=2, mesh_tensor=2)
    assert step == 20
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.mark.slow
def test_resume_with_a_different_model_names_the_difference(uninterrupted, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    other_model = tmp_path / "narrower_model"  # the tiny base with another width
    shutil.copytree(os.path.join(ROOT, "assets", "tiny_sft"), other_model)
    hf_config = json.loads((other_model / "config.json").read_text())
    hf_config.update(hidden_size=32, head_dim=8)
    (other_model / "config.json").write_text(json.dumps(hf_config))
    c = tiny_config(out)
    c.unlock()
    c.model_name_or_path = str(other_model)
    with pytest.raises(ValueError, match="different model: .*hidden_size.*64.*hidden_size.*32"):
        build.build(c)


@pytest.mark.slow
def test_resume_under_another_memory_mode_is_refused_and_the_same_mode_resumes(uninterrupted,
                                                                               tmp_path):
    # The uninterrupted run has float32 masters and moments (its checkpoint meta says so).
    out = tmp_path / "modes"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    for field, value in (("optimizer_state_dtype", "bfloat16"),
                         ("master_weights", "bfloat16_stochastic")):
        c = tiny_config(out)
        c.unlock()
        c[field] = value
        with pytest.raises(ValueError, match=f"{field}.*float32.*{value}.*cannot be converted"):
            build.build(c, with_data=False)
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]  # nothing touched
    c = tiny_config(out)
    c.unlock()
    c.offload_optimizer_state = True  # where the moments live is not part of the state
    run = build.build(c, with_data=False)
    assert run.start_step == 20
    assert {x.sharding.memory_kind for x in jax.tree.leaves(run.state.opt_state)} == {"pinned_host"}
    run.checkpointer.close()


@pytest.mark.slow
def test_export_mode_loads_in_transformers(uninterrupted, tmp_path):
    import torch
    import transformers
    from simpo_jax import models

    out = train.export_checkpoint(tiny_config(uninterrupted, export_dir=str(tmp_path / "export")))
    assert os.path.exists(os.path.join(out, "README.md"))
    card = open(os.path.join(out, "README.md")).read()
    assert "gamma_beta_ratio" in card and "meng2024simpo" in card
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = np.array([[1, 5, 9, 23, 7, 2]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = models.from_pretrained(out)
    np.testing.assert_allclose(np.asarray(ours(ids)), ref, atol=1e-4)


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "preempt"
    cmd = [sys.executable, "run.py", "--config=configs/tiny.py", f"--config.output_dir={out}",
           "--config.max_steps=60", "--config.logging_steps=1", "--config.eval_steps=1000",
           "--config.save_steps=1000"]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(train_rows(out)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_PREEMPTED, stdout  # not 0: the run did not finish
    assert "Rerun the same command to resume" in stdout, stdout
    saved = sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 60
    assert not os.path.exists(out / "config.json")  # no export: the run is not finished

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Resumed from {out / 'checkpoints'}/{saved[0]}" in proc.stdout
    steps = [r["step"] for r in train_rows(out)]
    assert steps[-1] == 60 and steps.count(saved[0] + 1) == 1
    assert os.path.exists(out / "config.json")


def test_preemption_guard_stops_on_a_signal_and_a_second_ctrl_c_at_once():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with preemption.PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(2) and guard.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs on this thread before the sleep returns
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_push_to_hub_uploads_export_and_model_card(uninterrupted, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from simpo_jax.hub import publish
    from hub_stand_in import HubStandIn

    import huggingface_hub.constants

    stand_in = HubStandIn()
    # The suite runs with HF_HUB_OFFLINE=1; only this stand-in on 127.0.0.1 is reachable.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(publish, "hub_api", lambda: HfApi(endpoint=stand_in.url, token="hf_test"))
    try:
        out = train.export_checkpoint(tiny_config(
            uninterrupted, export_dir=str(tmp_path / "pushed"), push_to_hub=True,
            hub_model_id="someone/tiny-simpo", hub_private_repo=True))
    finally:
        stand_in.close()
    assert stand_in.repos == [("someone/tiny-simpo", True)]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(stand_in.files)
    assert stand_in.files["README.md"] == open(os.path.join(out, "README.md"), "rb").read()
    assert b"SimPO" in stand_in.files["README.md"]


@pytest.mark.slow
def test_push_failure_is_clear_and_keeps_the_export(uninterrupted, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from simpo_jax.errors import HubError
    from simpo_jax.hub import publish

    import huggingface_hub.constants

    # Nothing listens on this port: the upload fails as it would without a network.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(publish, "hub_api", lambda: HfApi(endpoint="http://127.0.0.1:9", token="x"))
    with pytest.raises(HubError, match="local export .* is kept"):  # one line: run.py: error:
        train.export_checkpoint(tiny_config(uninterrupted, export_dir=str(tmp_path / "kept"),
                                            push_to_hub=True, hub_model_id="someone/m"))
    assert os.path.exists(tmp_path / "kept" / "config.json")
