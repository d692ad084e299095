"""Two real processes joined by jax.distributed on 127.0.0.1 (gloo CPU collectives), 4 devices each."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config=configs/tiny.py", "--config.max_steps=8", "--config.save_steps=4",
          "--config.eval_steps=4", "--config.logging_steps=1", "--config.save_total_limit=0",
          "--config.per_device_train_batch_size=2", "--config.per_device_eval_batch_size=8",
          "--config.export_dtype=float32"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices):
    e = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return e


def run_two_processes(out):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "run.py", *COMMON, f"--config.output_dir={out}",
         f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
         f"--config.process_id={i}"], cwd=ROOT, env=env(4), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-4000:]
    return outputs


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "run.py", *COMMON, f"--config.output_dir={single}"],
                          cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    multi = tmp_path / "multi"
    outputs = run_two_processes(multi)
    assert "effective batch size: 16 pairs" in outputs[0]
    ref = {(r["step"], k): v for r in rows(single) for k, v in r.items() if k != "step"}
    got = {(r["step"], k): v for r in rows(multi) for k, v in r.items() if k != "step"}
    assert len(rows(multi)) == len(rows(single))  # process 0 alone writes metrics
    for key in ref:
        if key[1] in ("tokens_per_second", "pairs_per_second", "mfu"):  # wall-clock figures
            continue
        assert got[key] == pytest.approx(ref[key], abs=1e-5), key

    # Resume: drop the last checkpoint and the export, rerun the same command on two processes.
    shutil.rmtree(multi / "checkpoints" / "8")
    os.remove(multi / "config.json")
    outputs = run_two_processes(multi)
    assert "Resumed from" in outputs[0] and "/checkpoints/4" in outputs[0]
    final = [r for r in rows(multi) if r["step"] == 8 and "loss" in r][-1]
    assert final["loss"] == pytest.approx(ref[(8, "loss")], abs=1e-5)
    assert os.path.exists(multi / "config.json")  # exported by process 0

    torch = pytest.importorskip("torch")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(multi)
    ref_hf = transformers.AutoModelForCausalLM.from_pretrained(single)
    for (name, a), (_, b) in zip(hf.named_parameters(), ref_hf.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
