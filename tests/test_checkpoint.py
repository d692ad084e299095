"""Checkpoints: exact resume, damaged checkpoints, mesh changes, preemption, export and push."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from simpo_jax import build, train

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


def final_params(output_dir, **overrides):
    run = build.build(tiny_config(output_dir, **overrides), with_data=False)
    run.checkpointer.close()
    return jax.tree.map(np.asarray, run.state.params), run.start_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train.train(tiny_config(out))
    return out


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "20")  # as if the run had stopped after step 10
    train.train(tiny_config(out))
    ref, got = train_rows(uninterrupted), train_rows(out)
    assert [r["step"] for r in got] == [15, 20]
    for r_ref, r in zip(ref[2:], got):
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
    c = tiny_config(out)
    c.unlock()
    c.model_init.hidden_size = 32
    with pytest.raises(ValueError, match="different model: .*hidden_size.*64.*hidden_size.*32"):
        build.build(c)


@pytest.mark.slow
def test_export_mode_loads_in_transformers(uninterrupted, tmp_path):
    torch = pytest.importorskip("torch")
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
    assert proc.returncode == 0, stdout
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


@pytest.mark.slow
def test_push_to_hub_uploads_export_and_model_card(uninterrupted, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from simpo_jax import hub
    from hub_stand_in import HubStandIn

    import huggingface_hub.constants

    stand_in = HubStandIn()
    # The suite runs with HF_HUB_OFFLINE=1; only this stand-in on 127.0.0.1 is reachable.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub, "hub_api", lambda: HfApi(endpoint=stand_in.url, token="hf_test"))
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
    from simpo_jax import hub

    import huggingface_hub.constants

    # Nothing listens on this port: the upload fails as it would without a network.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub, "hub_api", lambda: HfApi(endpoint="http://127.0.0.1:9", token="x"))
    with pytest.raises(RuntimeError, match="local export .* is kept"):
        train.export_checkpoint(tiny_config(uninterrupted, export_dir=str(tmp_path / "kept"),
                                            push_to_hub=True, hub_model_id="someone/m"))
    assert os.path.exists(tmp_path / "kept" / "config.json")
