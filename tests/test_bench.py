"""Every bench/ script runs end to end with --dry-run (tiny sizes, same code path), so none rots.

Speed and memory targets are checked by the bench scripts on real sizes, never by timed tests;
this only proves each script still runs and prints its result lines. A new script is picked up
by the glob: without --dry-run it fails here.
"""

import os
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
                         "RESULT lr=0.001 steps=3 eval_loss", "RESULT lr=0.01 steps=3 eval_loss",
                         "RANGE ", "RESULT lr_find suggestion"],
    "simpo_vs_trl.py": ["throughput ratio vs TRL:"],
    "peak_check.py": ["MFU basis"],
    "memory_modes.py": ["| master weights | moments | offload |"],
}
# Over ~20 s on 2 CPU cores (compiles, tiny trainings, torch and transformers imports).
SLOW = {"generate_vs_hf.py", "gpu_check.py", "tiny_lr_sweep.py", "simpo_vs_trl.py",
        "memory_modes.py"}


def test_the_glob_finds_the_scripts():
    assert {"generate_vs_hf.py", "gpu_check.py", "tiny_lr_sweep.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in SCRIPTS])
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
