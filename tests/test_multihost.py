"""Two real processes joined by jax.distributed on 127.0.0.1 (gloo CPU collectives), 4 devices each."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config=configs/tiny.py", "--config.max_steps=8", "--config.save_steps=4",
          "--config.eval_steps=4", "--config.logging_steps=1", "--config.save_total_limit=0",
          "--config.per_device_train_batch_size=2", "--config.per_device_eval_batch_size=8",
          "--config.export_dtype=float32"]
WALL_CLOCK = ("tokens_per_second", "pairs_per_second", "mfu")
TIMEOUT = 600  # seconds for one run of both processes; a hang fails the test instead of CI


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices):
    e = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return e


def start_two_processes(out):
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "run.py", *COMMON, f"--config.output_dir={out}",
         f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
         f"--config.process_id={i}"], cwd=ROOT, env=env(4), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(procs, deadline, status=0):
    """Both processes' outputs once both exit `status`; kills both and fails on a hang or an error."""
    try:
        outputs = [p.communicate(timeout=max(deadline - time.time(), 1))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        pytest.fail("the processes hung; their last output:\n" +
                    "\n".join(f"--- process {i}\n{o[-3000:]}" for i, o in enumerate(outputs)))
    for i, (p, o) in enumerate(zip(procs, outputs)):
        assert p.returncode == status, f"process {i} exited {p.returncode}:\n{o[-4000:]}"
    return outputs


def run_two_processes(out):
    return finish(start_two_processes(out), time.time() + TIMEOUT)


def rows(out):
    if not os.path.exists(os.path.join(out, "metrics.jsonl")):
        return []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def by_step(out):
    return {(r["step"], k): v for r in rows(out) for k, v in r.items() if k != "step"}


def assert_same_metrics(got, ref):
    for key in ref:
        if key[1] not in WALL_CLOCK:
            # float32 sums in another order over the processes' shards: relative 1e-5 on
            # values like a grad_norm of 11.5, absolute 1e-5 near zero
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The uninterrupted run on one process with all 8 devices: the reference."""
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, "run.py", *COMMON, f"--config.output_dir={out}"],
                          cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(single, tmp_path):
    multi = tmp_path / "multi"
    outputs = run_two_processes(multi)
    assert "effective batch size: 16 pairs" in outputs[0]
    ref = by_step(single)
    assert len(rows(multi)) == len(rows(single))  # process 0 alone writes metrics
    assert_same_metrics(by_step(multi), ref)

    # Resume: drop the last checkpoint and the export, rerun the same command on two processes.
    shutil.rmtree(multi / "checkpoints" / "8")
    os.remove(multi / "config.json")
    outputs = run_two_processes(multi)
    assert "Resumed from" in outputs[0] and "/checkpoints/4" in outputs[0]
    final = [r for r in rows(multi) if r["step"] == 8 and "loss" in r][-1]
    assert final["loss"] == pytest.approx(ref[(8, "loss")], abs=1e-5)
    assert os.path.exists(multi / "config.json")  # exported by process 0

    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(multi)
    ref_hf = transformers.AutoModelForCausalLM.from_pretrained(single)
    for (name, a), (_, b) in zip(hf.named_parameters(), ref_hf.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


GUARD_LOOP = """
import os, signal, sys
import jax, jax.numpy as jnp, numpy as np
from simpo_jax import preemption, sharding
process, target, sig = (int(a) for a in sys.argv[1:4])
sharding.initialize_distributed(sys.argv[4], 2, process)
sharded = jax.sharding.NamedSharding(jax.make_mesh((8,), ("d",)), jax.P("d"))
x = jax.make_array_from_process_local_data(sharded, np.ones((4, 256), np.float32))
step_fn = jax.jit(lambda x: x * 0.5 + jnp.sum(x) / x.size, out_shardings=sharded)  # a collective
with preemption.PreemptionGuard() as guard:
    for step in range(1, 1000):
        x = step_fn(x)
        if step == 5 and process == target:
            os.kill(os.getpid(), sig)
        if guard.should_stop(step):
            print(f"stopped by {guard.signal_name} after step {step}", flush=True)
            break
"""


@pytest.mark.parametrize("process, sig", [(1, signal.SIGTERM),
                                          pytest.param(0, signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM-to-process-1", "SIGINT-to-process-0"])
def test_the_guard_stops_every_process_after_the_same_step(process, sig):
    """A loop of collectives on two processes; the signal reaches one of them at step 5."""
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", GUARD_LOOP, str(i), str(process),
                               str(int(sig)), address], cwd=ROOT, env=env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = finish(procs, time.time() + 120)
    stopped = [re.findall(r"stopped by (.+) after step (\d+)", o) for o in outputs]
    name = signal.Signals(sig).name
    assert stopped[0] == stopped[1] == [(f"{name} on process {process}", "6")], outputs


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(single, tmp_path):
    """SIGTERM reaches process 1 alone (not the coordinator); the guard test above covers the
    others. Both save the same step and exit 75 (preempted); rerun, they end where the uninterrupted run does."""
    out = tmp_path / "preempted"
    procs = start_two_processes(out)
    deadline = time.time() + TIMEOUT
    try:  # once step 2 is logged: the loop runs, with steps left to stop early
        while not any(r["step"] >= 2 and "loss" in r for r in rows(out)):
            assert all(p.poll() is None for p in procs), "a process ended before the signal"
            assert time.time() < deadline, "no train step logged"
            time.sleep(0.2)
    except AssertionError:
        for p in procs:
            p.kill()
        raise
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs, time.time() + 300, status=75)  # cli.EXIT_PREEMPTED

    stopped = [re.search(r"Stopped by SIGTERM on process 1 after step (\d+)/8; "
                         r"checkpoint saved in (\S+)\. Rerun the same command to resume", o)
               for o in outputs]
    assert all(stopped), outputs[0][-3000:] + outputs[1][-3000:]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step and 2 <= step < 8
    assert stopped[0].group(2) == f"{out / 'checkpoints'}/{step}"
    assert max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()) == step
    assert not os.path.exists(out / "config.json")  # not finished: no export

    outputs = run_two_processes(out)
    assert f"Resumed from {out / 'checkpoints'}/{step}" in outputs[0]
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, 9))
    assert_same_metrics(by_step(out), by_step(single))
    got, ref = load_file(out / "model.safetensors"), load_file(single / "model.safetensors")
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5, err_msg=key)
