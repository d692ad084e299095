"""The benches' --dry-run: tiny sizes, the same code paths and output format as the real runs."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = r"throughput ratio vs TRL: \d+\.\d\dx"


def run_bench(*args, timeout=900):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run([sys.executable, *args, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


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
