"""The memory planner: exact sharded parameter bytes, the fits verdict, a real TPU AOT compile."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import base
from simpo_jax import plan as plan_lib
from simpo_jax import plan_report, plan_targets
from simpo_jax import sharding as sharding_lib

TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False)


def tiny_config(tmp_path, **overrides):
    c = base.get_config()
    c.plan_target = "gpu-h100x8"  # the estimate path, on conftest's 8 CPU devices
    c.plan_gpu_compiler = "cpu"
    c.model_init = TINY
    c.output_dir = str(tmp_path)
    c.per_device_train_batch_size, c.gradient_accumulation_steps, c.max_length = 1, 2, 32
    c.batch_layout = "padded"  # the figures below are worked for [pairs, 2, max_length] batches
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def cpu_plan(tmp_path_factory):
    """One compile (about 10 s) shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("plan")
    return tmp_path, plan_lib.plan(tiny_config(tmp_path))


@pytest.mark.slow
def test_cpu_estimate_bytes_add_up_and_params_are_exact(cpu_plan):
    tmp_path, out = cpu_plan
    (r,) = out["tried"]
    assert r["kind"] == "estimate" and r["num_devices"] == 8 and r["fits"]
    for key in ("params_bytes", "opt_state_bytes", "temp_bytes", "total_bytes",
                "xla_flops_per_device", "model_flops_per_step", "activation_estimate_bytes"):
        assert r[key] > 0, key
    # Exact parameter bytes: every float32 weight split over the fsdp axis where it divides.
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(), jax.devices()[:8])
    hidden, inter, vocab, kv = 64, 128, 128, 2 * 16
    sizes = {"embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
             "q_proj": (2, hidden, hidden), "k_proj": (2, kv, hidden), "v_proj": (2, kv, hidden),
             "o_proj": (2, hidden, hidden), "gate_proj": (2, inter, hidden),
             "up_proj": (2, inter, hidden), "down_proj": (2, hidden, inter)}
    expected = sum(4 * x.size // 8 for x in map(lambda s: jax.ShapeDtypeStruct(s, "float32"),
                                                 sizes.values()))
    expected += 4 * (2 * hidden + 2 * hidden + hidden)  # replicated norms: 2 per layer + final
    assert mesh.shape["fsdp"] == 8 and r["params_bytes"] == expected
    assert r["opt_state_bytes"] == 2 * expected + 2 * 4  # Adam mu, nu; two int32 counts
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                + r["temp_bytes"] + r["code_bytes"])
    assert r["needed_bytes"] >= r["params_bytes"] + r["opt_state_bytes"]
    assert json.load(open(tmp_path / "plan.json"))["choice"]["params_bytes"] == expected


@pytest.mark.slow
def test_model_flops_are_the_mfu_count(cpu_plan):
    from simpo_jax import flops, models

    (r,) = cpu_plan[1]["tried"]
    arch, _ = models.arch_from_hf_config(TINY)
    pairs = 1 * 8 * 2  # per-device batch x data-parallel devices x accumulation
    assert r["model_flops_per_step"] == flops.model_flops(arch, tokens=pairs * 2 * 32, seq_len=32)


@pytest.mark.slow
def test_a_plan_that_does_not_fit_ends_with_what_to_try(cpu_plan, tmp_path, monkeypatch, capsys):
    (r,) = cpu_plan[1]["tried"]
    monkeypatch.setattr(plan_lib, "compile_step", lambda *a, **k: dict(r))  # no second compile
    c = tiny_config(tmp_path, plan_capacity_gib=1e-6, per_device_train_batch_size=2)
    out = plan_lib.plan(c)
    assert out["choice"] is None
    printed = capsys.readouterr().out
    tail = printed[printed.index("Nothing tried fits"):]
    for needle in ("--config.plan_search=True", "--config.gradient_checkpointing=True",
                   "--config.logits_chunk_size=256",
                   "--config.per_device_train_batch_size=1 --config.gradient_accumulation_steps=4",
                   "bfloat16 masters"):
        assert needle in tail, needle
    assert json.load(open(tmp_path / "plan.json"))["next_steps"] == out["next_steps"]
    # Already searched, remat and chunked: those lines go; a target with more memory is named.
    c = tiny_config(tmp_path, plan_target="tpu-v5e-8", plan_search=True,
                    gradient_checkpointing=True, logits_chunk_size=128)
    steps = plan_report.next_steps(c, dict(out, target="tpu-v5e-8"))
    assert not any("plan_search" in s or "gradient_checkpointing" in s or "logits_chunk_size" in s
                   for s in steps)
    assert any("tpu-v6e-8 (8 x 32 GiB)" in s and "8 x 16 GiB" in s for s in steps)
    # Nothing compiled: memory advice would mislead.
    failed = dict(out, tried=[{"remat_policy": "none", "mesh": {}, "error": "INTERNAL"}])
    (only,) = plan_report.next_steps(c, failed)
    assert "no configuration compiled" in only


LOCKED = ('ABORTED: Internal error when accessing libtpu multi-process lockfile. Run "$ sudo rm '
          '/tmp/libtpu_lockfile".')  # what libtpu 0.0.42.1 says when another process holds it


def test_libtpu_lockfile_held_elsewhere_is_one_line_with_the_fix(monkeypatch):
    from jax.experimental import topologies

    def held(**_):
        raise jax.errors.JaxRuntimeError(LOCKED)

    monkeypatch.setattr(topologies, "get_topology_desc", held)
    with pytest.raises(ValueError) as e:
        plan_targets.target_devices(plan_targets.TARGETS["tpu-v5e-8"])
    message = str(e.value)
    assert "\n" not in message and "ALLOW_MULTIPLE_LIBTPU_LOAD=1" in message
    assert "sudo rm" not in message  # libtpu's own advice would break the process holding it


@pytest.mark.slow
def test_verdict_flips_with_tiny_capacity(cpu_plan):
    (r,) = cpu_plan[1]["tried"]
    target = plan_targets.TARGETS["gpu-h100x8"]
    assert plan_lib.verdict(dict(r), target, r["needed_bytes"])["fits"]
    assert not plan_lib.verdict(dict(r), target, r["needed_bytes"] - 1)["fits"]
    assert not plan_lib.verdict(dict(r), target, 1024)["fits"]


def test_search_tries_the_config_first_then_cumulative_changes_keeping_the_batch(tmp_path):
    c = tiny_config(tmp_path, plan_search=True, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2)
    tried = plan_lib.candidates(c)
    assert tried[0] == plan_lib.setting_of(c)
    assert len({json.dumps(t, sort_keys=True) for t in tried}) == len(tried)  # no repeats
    devices = 8
    for t in tried:  # every setting keeps the effective batch (pairs per optimizer step)
        data_parallel = devices // t["mesh_tensor"]
        assert (t["per_device_train_batch_size"] * data_parallel * t["gradient_accumulation_steps"]
                == 4 * devices * 2)
    last = tried[-1]
    assert last["master_weights"] == "bfloat16_kahan" and last["offload_optimizer_state"]
    assert last["per_device_train_batch_size"] == 1 and last["mesh_tensor"] == 2
    assert last["gradient_accumulation_steps"] == 2 * 4 * 2
    c.plan_search = False
    assert plan_lib.candidates(c) == [plan_lib.setting_of(c)]


def test_shipped_hub_configs_match_public_sizes():
    from flax import nnx

    from simpo_jax import models

    expected = {"mistralai/Mistral-7B-v0.1": 7.24e9, "meta-llama/Meta-Llama-3-8B-Instruct": 8.03e9,
                "google/gemma-2-9b-it": 9.24e9, "meta-llama/Meta-Llama-3-70B-Instruct": 70.55e9,
                "deepseek-ai/deepseek-math-7b-base": 6.91e9, "HuggingFaceH4/zephyr-7b-beta": 7.24e9}
    for name, count in expected.items():
        c = base.get_config()
        c.model_name_or_path = name
        model = nnx.eval_shape(lambda: models.from_config(plan_lib.hf_config_of(c)))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert abs(n - count) / count < 1e-3, (name, n)


TPU_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from configs import base
from simpo_jax import plan
c = base.get_config()
c.plan_target, c.plan_search, c.plan_capacity_gib = "tpu-v5e-8", False, 0.0
c.model_init = dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, tie_word_embeddings=False)
c.bf16, c.gradient_checkpointing, c.output_dir = True, True, sys.argv[2]
c.per_device_train_batch_size, c.gradient_accumulation_steps, c.max_length = 2, 2, 256
c.batch_layout = "padded"  # the token count below is worked for [pairs, 2, max_length] batches
plan.plan(c)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_v5e_aot_compile_reports_memory_and_flops(tmp_path):
    # get_topology_desc works under JAX_PLATFORMS=cpu; a fresh process keeps libtpu (its
    # machine-wide lockfile, skipped by ALLOW_MULTIPLE_LIBTPU_LOAD: other runs may hold it) apart.
    env = dict(os.environ, TPU_ACCELERATOR_TYPE="v5litepod-8", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", TPU_CHECK, root, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.load(open(tmp_path / "plan.json"))["tried"]
    assert r["kind"] == "compiled" and r["num_devices"] == 8 and r["mesh"]["fsdp"] == 8
    assert r["capacity_bytes"] == 16 * 2**30 and r["fits"]
    # 6 x params x tokens (+ attention); XLA's count sees each loop body once, so it is lower.
    tokens = 2 * 8 * 2 * 2 * 256
    assert 5 * r["num_params"] * tokens < r["model_flops_per_step"] < 7 * r["num_params"] * tokens
    assert 0 < r["xla_flops_per_device"] * 8 < r["model_flops_per_step"]
    assert r["temp_bytes"] > 0 and r["params_bytes"] > 0


@pytest.mark.slow
def test_gpu_estimate_runs_in_its_own_process_when_devices_are_missing(tmp_path):
    # What --mode=plan does when Python started without 8 CPU devices.
    out = plan_lib._plan_in_subprocess(tiny_config(tmp_path), 8)
    (r,) = out["tried"]
    assert r["kind"] == "estimate" and r["num_devices"] == 8 and r["params_bytes"] > 0


HOLD_LIBTPU = """
import sys, time
from jax.experimental import topologies
topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_plan_while_another_process_holds_libtpu(tmp_path):
    env = dict(os.environ, TPU_ACCELERATOR_TYPE="v5litepod-8", JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LIBTPU], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if holder.stdout.readline().strip() != "holding":
            pytest.skip("another process already holds libtpu's lockfile")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run([sys.executable, "-c", TPU_CHECK, root, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "ALLOW_MULTIPLE_LIBTPU_LOAD=1" in last and "lockfile" in last, proc.stderr[-2000:]


def _run_plan(tmp_path, *flags):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "run.py", "--config=configs/tiny.py", "--mode=plan",
                           "--config.plan_target=gpu-h100x1", "--config.plan_gpu_compiler=cpu",
                           f"--config.output_dir={tmp_path}",
                           *flags], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.load(open(tmp_path / "plan.json"))


@pytest.mark.slow
def test_suggested_overrides_pasted_back_plan_as_fitting(tmp_path):
    # The tiny default on one (estimated) GPU, against a capacity just under its own need: the
    # search ends with the overrides of a setting that fits; pasted back, that setting fits alone.
    _, own = _run_plan(tmp_path)
    (first,) = own["tried"]
    capacity = f"--config.plan_capacity_gib={0.9 * first['needed_bytes'] / 2**30}"
    printed, searched = _run_plan(tmp_path, "--config.plan_search=True", capacity)
    assert not searched["tried"][0]["fits"] and searched["choice"]["overrides"]
    flags = printed[printed.index("Fits with these overrides"):].splitlines()[1].split()
    assert flags == searched["choice"]["overrides"]
    printed, pasted = _run_plan(tmp_path, capacity, *flags)
    (again,) = pasted["tried"]
    assert again["fits"] and "Fits as configured." in printed
    assert again["needed_bytes"] == searched["choice"]["needed_bytes"]


@pytest.mark.slow
def test_plan_compiles_the_configured_layout_and_memory_modes(tmp_path):
    c = tiny_config(tmp_path, plan_target="gpu-h100x1", batch_layout="packed",
                    pack_row_length=48, pack_rows_per_device=3, master_weights="bfloat16_kahan",
                    optimizer_state_dtype="bfloat16", offload_optimizer_state=True)
    (r,) = plan_lib.plan(c)["tried"]
    assert r["batch_layout"] == "packed" and r["row_length"] == 48 and r["rows_per_device"] == 3
    # Global rows x row length tokens: 3 rows x 2 micro-batches on one device.
    assert r["batch_bytes"] > 3 * 2 * 48 * 4 * 4
    n = r["num_params"]
    assert r["params_bytes"] == 2 * n  # bfloat16 masters
    assert r["opt_state_bytes"] == 0  # moments and compensation in host memory
    # Two bfloat16 moments and a bfloat16 compensation per parameter, plus counters and a key.
    assert 3 * 2 * n <= r["host_bytes"] < 3 * 2 * n + 64


@pytest.mark.slow
def test_plan_of_a_lora_run_compiles_adapters_over_a_frozen_base(tmp_path):
    c = tiny_config(tmp_path, plan_target="gpu-h100x1", lora_rank=4, lora_alpha=8.0)
    (r,) = plan_lib.plan(c)["tried"]
    assert r["setting"]["lora_rank"] == 4 and r["fits"]
    h, i, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    q, kv = h, h // 2  # 4 heads, 2 key-value heads of 16
    # Rank-4 A [r, in] and B [out, r] of q k v o gate up down, float32, are all that is trained.
    adapters = 4 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)) * layers
    assert r["params_bytes"] == 4 * adapters
    assert r["opt_state_bytes"] >= 2 * r["params_bytes"]
    assert r["num_params"] == adapters  # the trained parameters
    v = TINY["vocab_size"]
    base = 2 * v * h + layers * (h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h) + h
    assert r["frozen_bytes"] == 4 * base  # the frozen base, in the (float32) compute dtype
