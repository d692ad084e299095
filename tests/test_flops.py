"""Model FLOPs (one count for MFU and the planner) and the peak of the compute dtype."""

import types

import jax
import jax.numpy as jnp
import pytest

from simpo_jax import flops, models, plan

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000)


def test_llama2_7b_counts():
    arch, _ = models.arch_from_hf_config(LLAMA2_7B)
    # 32 layers x (4 attention projections 4096^2 + 3 MLP 4096x11008) + LM head 32000x4096
    assert flops.non_embedding_params(arch) == 6_607_077_376
    per_token = flops.model_flops_per_token(arch, seq_len=2048)
    # PaLM appendix B: attention over the full 2048 x 2048 scores, causal masking not discounted.
    assert per_token == 6 * 6_607_077_376 + 12 * 32 * 2048 * 4096
    assert flops.model_flops(arch, tokens=4096, seq_len=2048) == 4096 * per_token


def test_the_planner_counts_with_the_same_function():
    assert not hasattr(plan, "model_flops")  # no second formula to drift from this one
    assert plan.flops is flops


def fake_device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989e12),
    ("NVIDIA H100 80GB HBM3", jnp.float32, 495e12),  # TF32 tensor cores
    ("NVIDIA H100 PCIe", jnp.bfloat16, 756e12),
    ("NVIDIA H200", "float32", 495e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("TPU v5 lite", jnp.bfloat16, 197e12),
    ("TPU v5", jnp.bfloat16, 459e12),  # v5p
    ("TPU v4", jnp.bfloat16, 275e12),
])
def test_datasheet_peak_of_the_compute_dtype(kind, dtype, peak):
    value, source = flops.peak_flops_per_device(fake_device(kind), dtype)
    assert value == peak and kind in source and jnp.dtype(dtype).name in source


def test_no_datasheet_figure_for_the_dtype_is_measured_in_that_dtype(monkeypatch):
    seen = []
    monkeypatch.setattr(flops, "measured_matmul_flops",
                        lambda size, dtype, device=None: seen.append((size, dtype)) or 1e12)
    value, source = flops.peak_flops_per_device(fake_device("TPU v5 lite", "tpu"), jnp.float32)
    assert value == 1e12 and [(s, jnp.dtype(d)) for s, d in seen] == [(8192, jnp.float32)]
    assert "measured 8192x8192 float32" in source


def test_cpu_peak_is_measured_in_the_compute_dtype(monkeypatch):
    f32, source = flops.peak_flops_per_device(jax.devices()[0], jnp.float32)
    assert f32 > 1e8 and "measured 2048x2048 float32" in source
    seen = []
    monkeypatch.setattr(flops, "measured_matmul_flops",
                        lambda size, dtype, device=None: seen.append((size, dtype)) or 1e9)
    _, source = flops.peak_flops_per_device(jax.devices()[0], "bfloat16")
    assert [(s, jnp.dtype(d)) for s, d in seen] == [(1024, jnp.bfloat16)] and "bfloat16" in source
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        flops.peak_flops_per_device(jax.devices()[0], jnp.float16)
