"""Every bench/ script runs end to end with --dry-run (tiny sizes, same code path), so none rots.

Speed and memory targets are checked by the bench scripts on real sizes, never by timed tests;
this only proves each script still runs and prints its result lines. A new script is picked up
by the glob: without --dry-run it fails here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
TIMEOUT_S = 600  # a hang fails the test instead of blocking the suite

# The lines each dry run must print (its results), besides saying it is a dry run.
EXPECTED = {
    "generate_vs_hf.py": ["dry run: sizes shrunk, figures meaningless",
                          "simpo_jax:", "transformers:", "ratio simpo_jax / transformers:"],
    "gpu_check.py": ["dry run: sizes shrunk, figures meaningless",
                     "float32 xla      packed         max |avg logp - padded|",
                     "bfloat16 xla     shared_prompt  max |avg logp - padded|",
                     "layout        attention  pairs/step  median s  real tok/s  pairs/s     MFU",
                     "padded        xla", "packed        xla", "shared_prompt xla"],
    "tiny_lr_sweep.py": ["dry run: sizes shrunk, figures meaningless",
                         "RESULT lr=0.01 steps=3 eval_loss",
                         "RANGE ", "RESULT lr_find suggestion"],
    "memory_modes.py": ["| master weights | moments | offload |"],
}
# Scripts whose dry run has a test of its own below (their output checked line by line).
OWN_TESTS = {"peak_check.py", "simpo_vs_trl.py",
             "device_check.py"}  # tests/test_kernels.py checks its dry run's losses
# Over ~3 s on 2 CPU cores (compiles, tiny trainings, torch and transformers imports).
SLOW = {"generate_vs_hf.py", "gpu_check.py", "tiny_lr_sweep.py", "memory_modes.py",
        "checkpoint_checksum.py"}


def test_the_glob_finds_the_scripts():
    assert {"generate_vs_hf.py", "gpu_check.py", "tiny_lr_sweep.py"} <= set(SCRIPTS)
    for script in OWN_TESTS:  # checked before running: one ignoring the flag runs at full size
        assert "--dry-run" in (ROOT / "bench" / script).read_text(), script


@pytest.mark.parametrize("script", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in SCRIPTS if name not in OWN_TESTS])
def test_dry_run(script, tmp_path):
    path = ROOT / "bench" / script
    # Checked before running: a script that ignores the flag would run at full size.
    assert "--dry-run" in path.read_text(), f"bench/{script} has no --dry-run"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # conftest's XLA_FLAGS: 8 CPU devices
    try:
        done = subprocess.run([sys.executable, str(path), "--dry-run"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"bench/{script} --dry-run still running after {TIMEOUT_S} s; output:\n"
                    f"{(e.stdout or b'')[-3000:]!r}")
    tail = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"bench/{script} --dry-run exited {done.returncode}\n{tail}"
    assert "dry run" in done.stdout.lower(), f"bench/{script} never says it is a dry run\n{tail}"
    missing = [s for s in EXPECTED.get(script, []) if s not in done.stdout]
    assert not missing, f"bench/{script} --dry-run did not print {missing}\n{tail}"


RATIO = r"throughput ratio vs TRL: \d+\.\d\dx"


def run_bench(*args, timeout=900):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run([sys.executable, *args, "--dry-run"], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_peak_check_dry_run_compares_xla_and_torch_dots_on_cpu():
    out = run_bench("bench/peak_check.py", timeout=300)
    assert re.search(r"^CPU: \S.* \(\d+ cores\)", out, re.M), out
    for product in ("fwd", "dx", "dw"):
        assert re.search(rf"{product} XLA \d+\.\d / torch \d+\.\d", out), out


@pytest.mark.slow
def test_simpo_vs_trl_dry_run_prints_cpu_peaks_and_both_ratios():
    lines = run_bench("bench/simpo_vs_trl.py").strip().splitlines()
    text = "\n".join(lines)
    assert re.search(r"^CPU: \S", text, re.M) and "[64, 1024] x [1024, 2816]" in text, text
    for layout in ("padded", "packed", "shared_prompt"):
        assert re.search(rf"^head-heavy {layout}: {RATIO}$", text, re.M), text
    assert re.fullmatch(rf"representative shared_prompt: {RATIO}", lines[-2]), lines[-2:]
    assert re.fullmatch(RATIO, lines[-1]), lines[-1]  # the head-heavy ratio, tracked as before
