"""Splash (TPU) and flash (GPU) attention in Pallas interpret mode against the XLA path
(layers.attention with layers.base_mask / window_mask): outputs and gradients within 1e-5 of each
tensor's largest entry, float32, for every batch layout and Llama, Gemma 2, Gemma 3, Qwen3 shapes."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simpo_jax import models
from simpo_jax.data import packed_rows
from simpo_jax.models import kernels
from simpo_jax.models import layers as L
from simpo_jax.models.kernels import rows
from test_attention import LENGTHS, pairs_of
from test_packing import GEMMA2, GEMMA3, LLAMA

# (query heads, key/value heads, head dim, soft-cap, windows of the model's layers)
SHAPES = {
    "llama": (4, 2, 64, None, (L.NO_WINDOW,)),
    "gemma2": (4, 2, 128, 2.0, (40, L.NO_WINDOW)),  # logit soft-cap, local / global layers
    "gemma3": (4, 2, 128, None, (24, L.NO_WINDOW)),  # local / global, no soft-cap
    "qwen3": (4, 1, 128, None, (L.NO_WINDOW,)),  # 4 query heads per key/value head
}
ROWS = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5]), np.zeros(0, np.int64)]
# The quick tier's rows: 130 tokens (two tiles, the second nearly all padding)
SMALL = dict(lengths=[(20, 10, 15), (0, 8, 5), (7, 0, 9)], rows=ROWS[:1] + [np.array([2])],
             row_length=130)
LARGE = dict(lengths=LENGTHS, rows=ROWS, row_length=460)


def layout_batch(layout: str, lengths, rows, row_length: int) -> dict:
    """Rows of the layout: the last row is padding only; LENGTHS holds an empty prompt and an
    empty completion (an empty branch), prompts and completions across tile edges."""
    if layout != "padded":
        return dataclasses.asdict(packed_rows.make_rows(
            pairs_of(lengths), rows, layout=layout, pad_id=0, row_length=row_length,
            max_pairs_per_row=3))
    mask = np.zeros((4, row_length), np.int32)
    mask[0, :row_length // 2] = 1  # right padding
    mask[1, 40:] = 1  # left padding
    mask[2] = 1  # full
    return {"attention_mask": mask}


def inputs(layout, shape, sizes, seed=0):
    """q, k, v, cotangent (zero on queries that see nothing), the row mask, the XLA mask."""
    heads, kv, dim, _, _ = SHAPES[shape]
    batch = layout_batch(layout, **sizes)
    if layout == "padded":
        valid = jnp.asarray(batch["attention_mask"])
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        segments = branches = None
    else:
        segments, branches = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["branch_ids"])
        valid, positions = segments > 0, jnp.asarray(batch["positions"])
        if layout == "packed":
            branches = None
    keys = jax.random.split(jax.random.key(seed), 4)
    b, t = valid.shape
    q = jax.random.normal(keys[0], (b, t, heads, dim))
    k = jax.random.normal(keys[1], (b, t, kv, dim))
    v = jax.random.normal(keys[2], (b, t, kv, dim))
    cot = jax.random.normal(keys[3], q.shape) * (valid > 0)[:, :, None, None]
    return (q, k, v, cot, kernels.RowMask.of(valid, segments, branches),
            L.base_mask(valid, segments, branches), positions)


def max_error(got, want) -> float:
    """Largest difference over the largest entry of `want`."""
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / max(np.abs(want).max(), 1e-12))


def check(kernel, layout, shape, sizes=LARGE, break_mask=False, grads=True):
    q, k, v, cot, row_mask, mask, positions = inputs(layout, shape, sizes)
    _, _, dim, softcap, windows = SHAPES[shape]
    scale = dim ** -0.5 * 3.0  # logits of a few units, so the soft-cap and the softmax both bite
    if break_mask:  # the kernel sees one more key: the token after a segment's first one
        ids = np.array(row_mask.ids_BT)
        ids[0, 1] = ids[0, 0] + 1000
        row_mask = kernels.RowMask(jnp.asarray(ids), row_mask.branch_ids_BT)

    def xla(q, k, v, window):
        return L.attention(q, k, v, mask & L.window_mask(positions, window), scale=scale,
                           softcap=softcap)

    def pallas(q, k, v, window):
        return kernels.attention(q, k, v, row_mask.with_window(window), kernel=kernel,
                                 scale=scale, softcap=softcap, windows=windows)

    def out_and_grads(fn, window):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, window), q, k, v)
        return out * (cot != 0), vjp(cot) if grads else ()

    for window in sorted(set(windows)):  # every layer type, the window a traced scalar
        (out, grads), (want, want_grads) = (jax.jit(out_and_grads, static_argnums=0)(
            fn, jnp.int32(window)) for fn in (pallas, xla))
        assert np.isfinite(np.asarray(out)).all()
        errors = [max_error(out, want)] + [max_error(a, b) for a, b in zip(grads, want_grads)]
        assert max(errors) < 1e-5, (window, errors)


@pytest.mark.parametrize("kernel,layout,shape", [
    ("splash", "shared_prompt", "llama"),  # two calls
    pytest.param("flash", "packed", "qwen3", marks=pytest.mark.slow),
    pytest.param("splash", "shared_prompt", "gemma2", marks=pytest.mark.slow),  # soft-cap, window
])
def test_kernel_equals_xla_attention(kernel, layout, shape):
    check(kernel, layout, shape, SMALL)


# Every layout and every shape at least once on the large rows (each case is 20-45 s of
# interpreted Pallas on 2 CPU cores, so not their whole product): the quick cases above add
# splash on shared_prompt llama and flash on packed qwen3.
@pytest.mark.slow
@pytest.mark.parametrize("layout,shape", [
    ("padded", "llama"), ("packed", "gemma3"),  # gemma3: local and global layers
    ("shared_prompt", "gemma2"),  # soft-cap and window across both calls
    ("shared_prompt", "qwen3"),  # 4 query heads per key/value head
])
def test_splash_equals_xla_attention_everywhere(layout, shape):
    check("splash", layout, shape)


@pytest.mark.slow
@pytest.mark.parametrize("layout,shape", [("padded", "qwen3"), ("shared_prompt", "llama")])
def test_flash_equals_xla_attention_everywhere(layout, shape):
    check("flash", layout, shape)


def test_a_mask_one_token_off_fails():
    """The comparison catches a kernel mask that lets one query see one key too many."""
    with pytest.raises(AssertionError):
        check("splash", "packed", "llama", SMALL, break_mask=True, grads=False)


@pytest.mark.slow
def test_kernel_runs_per_shard_under_a_mesh():
    """Under jax.set_mesh the kernel runs in a shard_map (rows over data and fsdp, heads over
    tensor) and equals the unsharded call."""
    q, k, v, _, row_mask, _, _ = inputs("shared_prompt", "llama", SMALL)
    q, k, v = (jnp.concatenate([x] * 2) for x in (q, k, v))  # 4 rows: two per batch shard
    row_mask = jax.tree.map(lambda x: jnp.concatenate([x] * 2), row_mask)
    run = jax.jit(lambda q, k, v, m: kernels.attention(q, k, v, m, kernel="splash", scale=0.2,
                                                       softcap=None))
    want = run(q, k, v, row_mask)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        text = run.lower(q, k, v, row_mask).as_text()
        got = run(q, k, v, row_mask)
    assert "shard_map" in text or "manual" in text
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_shared_prompt_order_puts_rejected_after_prompt():
    ids = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    branches = jnp.asarray([[0, 0, 1, 2, 2, 0, 1, 2, 0, 0]])
    order = rows.rejected_first(ids, branches)
    np.testing.assert_array_equal(order[0], [0, 1, 3, 4, 2, 5, 7, 6, 8, 9])
    assert rows.pad_rows(300) == 384 and rows.block_size(384) == 128
    assert rows.block_size(1024) == 512 and rows.layer_windows((4096, 2**30), 2048) == ()


def test_selection_follows_the_devices_platform():
    assert L.select_attention("auto", 2.0, jnp.bfloat16, platform="tpu") == "splash"
    assert L.select_attention("auto", None, jnp.bfloat16, platform="gpu") == "cudnn"
    assert L.select_attention("auto", None, jnp.float32, platform="gpu") == "xla"
    assert L.select_attention("auto", None, jnp.float32, platform="cpu") == "xla"
    assert L.select_attention("splash", 2.0, jnp.float32, platform="cpu") == "splash"
    assert L.select_attention("flash", None, jnp.bfloat16, platform="gpu") == "flash"
    with pytest.raises(ValueError, match="'flash' cannot run: the model soft-caps"):
        L.select_attention("flash", 2.0, jnp.bfloat16, platform="gpu")
    with pytest.raises(ValueError, match="sliding-window layers"):
        L.select_attention("flash", None, jnp.bfloat16, windows=(4, L.NO_WINDOW), platform="gpu")
    with pytest.raises(ValueError, match="splash runs on tpu .*the devices are gpu"):
        L.select_attention("splash", None, jnp.bfloat16, platform="gpu")


def decoder_stats(config, impl, batch, layout):
    model = models.from_config(config, seed=1, attention=impl)
    graphdef, params = nnx.split(model, nnx.Param)
    real = (batch["segment_ids"] > 0)[..., None]

    def loss(params):
        h = nnx.merge(graphdef, params).hidden_states(
            batch["input_ids"], batch["segment_ids"] > 0, positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            branch_ids=batch["branch_ids"] if layout == "shared_prompt" else None)
        return (h * real).sum(), h

    return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.mark.slow
@pytest.mark.parametrize("config,layout", [
    (LLAMA, "packed"), (GEMMA2, "shared_prompt"), (GEMMA3, "shared_prompt")],
    ids=["llama", "gemma2", "gemma3"])
def test_decoder_with_splash_equals_xla(config, layout):
    """The tiny model's hidden states and gradients, attention_implementation splash vs xla."""
    batch = {k: jnp.asarray(v) for k, v in dataclasses.asdict(packed_rows.make_rows(
        pairs_of(SMALL["lengths"]), SMALL["rows"], layout=layout, pad_id=0,
        row_length=SMALL["row_length"], max_pairs_per_row=3)).items()}
    real = np.asarray(batch["segment_ids"] > 0)[..., None]
    (g_splash, h_splash), (g_xla, h_xla) = (decoder_stats(config, impl, batch, layout)
                                            for impl in ("splash", "xla"))
    assert max_error(np.where(real, h_splash, 0), np.where(real, h_xla, 0)) < 1e-5
    errors = jax.tree.map(max_error, g_splash, g_xla)
    assert max(jax.tree.leaves(errors)) < 1e-5, errors


TPU_PLAN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from configs import base
from simpo_jax import plan, plan_targets, sharding
from simpo_jax.models import kernels
calls = []
splash = kernels.KERNELS["splash"]
kernels.KERNELS["splash"] = lambda *a, **k: calls.append(k["interpret"]) or splash(*a, **k)
c = base.get_config()
c.model_init = dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=1024, tie_word_embeddings=False)
c.plan_target, c.bf16, c.gradient_checkpointing = "tpu-v5e-8", True, True
c.batch_layout, c.pack_row_length, c.pack_rows_per_device = "shared_prompt", 1000, 1
c.max_length, c.per_device_train_batch_size = 500, 1
devices = plan_targets.target_devices(plan_targets.TARGETS[c.plan_target])
out = {}
for impl in ("auto", "xla"):  # auto picks splash on TPU; setup traces it under the mesh
    c.attention_implementation = impl
    out["splash" if impl == "auto" else impl] = plan.compile_step(c, plan.hf_config_of(c), devices)
out["splash_calls_interpret"] = calls
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_train_step_compiles_for_tpu_v5e_with_splash_on_shared_prompt_rows():
    """The TPU compiler builds the train step with compiled (not interpreted) splash kernels,
    one shard per chip, from this CPU host; its per-chip memory is no more than the XLA path's."""
    env = dict(os.environ, TPU_ACCELERATOR_TYPE="v5litepod-8", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", TPU_PLAN, root], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["splash_calls_interpret"] and not any(out["splash_calls_interpret"])
    splash, xla = out["splash"], out["xla"]
    assert splash["row_length"] == 1000 and splash["num_devices"] == 8
    assert splash["temp_bytes"] <= xla["temp_bytes"], (splash["temp_bytes"], xla["temp_bytes"])


@pytest.mark.slow
def test_device_check_dry_run(capsys):
    """bench/device_check.py end to end on a tiny model: every layout, XLA and splash
    (interpreted), each first-step loss within bf16 rounding of the float32 CPU run."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import device_check

    device_check.main(["--dry-run"])
    lines = [x.split() for x in capsys.readouterr().out.splitlines()
             if x.split()[:1] and x.split()[0] in device_check.LAYOUTS]
    assert [x[:2] for x in lines] == [[layout, impl] for layout in device_check.LAYOUTS
                                      for impl in ("xla", "splash")]
    for row in lines:
        loss, reference = float(row[6]), float(row[7])
        assert abs(loss - reference) < 1e-2 * abs(reference), row
