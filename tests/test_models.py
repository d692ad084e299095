"""Model parity with Hugging Face transformers (PyTorch) for every family, sharding, scan, remat."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from simpo_jax import models
from simpo_jax import sharding as sharding_lib

T = 12
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)

GEMMA3_TEXT = dict(
    head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
    rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10.0),
                     "full_attention": dict(rope_type="linear", rope_theta=100.0, factor=8.0)})
PHI3 = dict(pad_token_id=0, eos_token_id=2, bos_token_id=1)  # Phi's defaults (32000) are > vocab
PHI3_LONGROPE = dict(rope_type="longrope", rope_theta=100.0, partial_rotary_factor=0.75,
                     short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                     long_factor=[1.0, 1.5, 2.5, 4.0, 7.0, 12.0])

VARIANTS = {
    "llama_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3_rope_bias": ("llama", dict(
        attention_bias=True, mlp_bias=True, head_dim=32,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    # written to config.json in the old (transformers 4) form: rope_scaling + rope_theta
    "llama_linear_rope_old_keys": ("llama", dict(
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral_window": ("mistral", dict(sliding_window=4)),
    "qwen2_bias_tied_window": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True,
                                             sliding_window=4, max_window_layers=1)),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # per-head q/k norm; head_dim 24 != hidden / heads = 16, as Qwen3-0.6B (1024 / 16 != 128)
    "qwen3_tied_head_dim": ("qwen3", dict(tie_word_embeddings=True, head_dim=24)),
    "qwen3_bias_window": ("qwen3", dict(attention_bias=True, use_sliding_window=True,
                                        sliding_window=4, max_window_layers=1)),
    # q/k norm over the whole projection, norms after attention and MLP only
    "olmo2": ("olmo2", dict(rms_norm_eps=1e-6, eos_token_id=2)),
    "olmo2_bias_mha": ("olmo2", dict(attention_bias=True, num_attention_heads=8,
                                     num_key_value_heads=8, eos_token_id=2)),
    # per-head (1 + w) q/k norm, sandwich norms, a RoPE table per layer type (local base on the
    # sliding layer, linear scaling on the full one; small bases so they differ within 12
    # positions); transformers' Gemma 3 ignores attn_logit_softcapping, Gemma3ForCausalLM
    # applies final_logit_softcapping
    "gemma3_text": ("gemma3_text", GEMMA3_TEXT),
    # fused qkv_proj / gate_up_proj in the checkpoint, a window on every layer
    "phi3_window": ("phi3", dict(PHI3, sliding_window=5)),
    # partial rotary (12 of 16 dims) and longrope: positions stay within original_max (short
    # factors) or pass it (long factors: the batch's largest position + 1 = 12 > 8); both scale
    # cos/sin by sqrt(1 + ln(128 / original) / ln(original))
    "phi3_partial_longrope_short": ("phi3", dict(PHI3, original_max_position_embeddings=64,
                                                 rope_parameters=PHI3_LONGROPE)),
    "phi3_partial_longrope_long": ("phi3", dict(PHI3, original_max_position_embeddings=8,
                                                rope_parameters=PHI3_LONGROPE)),
}


def hf_model(model_type, overrides, seed=0):
    """A tiny random transformers model with perturbed norms and biases (so conventions matter)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def save_variant(name, path):
    model_type, overrides = VARIANTS[name]
    model = hf_model(model_type, overrides)
    model.save_pretrained(path)
    if name == "llama_linear_rope_old_keys":
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return model


def padded_batch(seed=0, vocab=128):
    """Rows: left-padded, right-padded, unpadded."""
    ids = np.random.default_rng(seed).integers(0, vocab, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[0, :3] = 0
    mask[1, 8:] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, tmp_path):
    hf = save_variant(name, tmp_path)
    ours = models.from_pretrained(str(tmp_path))
    ids, mask = padded_batch()
    ref = hf_logits(hf, ids, mask)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(ours, ids, mask))
    assert got.dtype == np.float32 and got.shape == ref.shape
    for row, padding in enumerate(("left", "right", "none")):
        error = np.abs(got[row] - ref[row])[mask[row] == 1].max()
        assert error < 1e-4, (padding, error)
    assert np.isfinite(got).all()  # padding rows too


def test_parameter_paths_follow_hf_keys():
    model = models.from_config(dict(model_type="gemma2", **SMALL, head_dim=16))
    _, params = nnx.split(model, nnx.Param)
    paths = {sharding_lib.path_str(p): x.shape
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert paths["model.embed_tokens.weight"] == (128, 64)
    assert paths["model.layers.self_attn.q_proj.weight"] == (2, 64, 64)
    assert paths["model.layers.self_attn.k_proj.weight"] == (2, 32, 64)
    assert paths["model.layers.mlp.down_proj.weight"] == (2, 64, 128)
    assert paths["model.layers.pre_feedforward_layernorm.weight"] == (2, 64)
    assert paths["model.norm.weight"] == (64,)
    assert "lm_head.weight" not in paths  # tied
    np.testing.assert_array_equal(np.asarray(model.model.norm.weight[...]), 0.0)  # (1 + w) norms


def test_qk_norm_and_post_norm_parameters_follow_hf_keys():
    def shapes(model_type, **overrides):
        """(our {path: shape}, {HF key: shape} of our export, transformers' {key: shape})."""
        config = dict(model_type=model_type, **SMALL, **overrides)
        _, params = nnx.split(models.from_config(config), nnx.Param)
        ours = {sharding_lib.path_str(p): x.shape
                for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        exported = {k: v.shape for k, v in models.to_hf_tensors(models.from_config(config)).items()}
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**config))
        reference = {k: tuple(v.shape) for k, v in hf.state_dict().items()
                     if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
        return ours, exported, reference

    q, exported, reference = shapes("qwen3", head_dim=24, tie_word_embeddings=True)
    assert exported == reference
    assert q["model.layers.self_attn.q_proj.weight"] == (2, 4 * 24, 64)
    assert q["model.layers.self_attn.q_norm.weight"] == (2, 24)  # per head
    assert q["model.layers.self_attn.k_norm.weight"] == (2, 24)
    assert "lm_head.weight" not in q and "model.layers.post_feedforward_layernorm.weight" not in q
    o, exported, reference = shapes("olmo2", eos_token_id=2)
    assert exported == reference
    assert o["model.layers.self_attn.q_norm.weight"] == (2, 64)  # whole projection, H * E
    assert o["model.layers.self_attn.k_norm.weight"] == (2, 32)  # K * E
    assert o["model.layers.post_attention_layernorm.weight"] == (2, 64)
    assert o["model.layers.post_feedforward_layernorm.weight"] == (2, 64)
    assert "model.layers.input_layernorm.weight" not in o and "lm_head.weight" in o


def test_from_config_dict_defaults_and_init():
    config = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.05)
    model = models.from_config(config, seed=1)
    w = np.asarray(model.model.layers.mlp.up_proj.weight[...])
    assert abs(w.std() - 0.05) < 0.005
    np.testing.assert_array_equal(np.asarray(model.model.layers.input_layernorm.weight[...]), 1.0)
    assert model.hf_config_dict["model_type"] == "llama"
    assert model.arch.num_layers == 2 and model.arch.head_dim == 8
    with pytest.raises(ValueError, match="gpt2.*supported model types: gemma2, gemma3, "
                                         "gemma3_text, llama"):
        models.from_config(dict(model_type="gpt2"))


@pytest.mark.slow
def test_mesh_loading_shards_params_and_keeps_logits(tmp_path):
    hf = save_variant("llama_untied", tmp_path)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=1, fsdp=4, tensor=2))
    ours = models.from_pretrained(str(tmp_path), mesh=mesh)
    q = ours.model.layers.self_attn.q_proj.weight[...]
    assert q.sharding.spec == P(None, "tensor", "fsdp")
    assert ours.lm_head.weight[...].sharding.spec == P("tensor", "fsdp")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 16)
    ids, mask = padded_batch()
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(ours, ids, mask))
    assert np.abs(got - hf_logits(hf, ids, mask))[mask == 1].max() < 1e-4

    rand = models.from_config(hf.config, mesh=mesh, seed=0)
    assert rand.model.layers.mlp.down_proj.weight[...].sharding.spec == P(None, "fsdp", "tensor")
    np.testing.assert_allclose(  # same values as an unsharded init of the same seed (to rounding)
        np.asarray(rand.model.layers.mlp.down_proj.weight[...]),
        np.asarray(models.from_config(hf.config, seed=0).model.layers.mlp.down_proj.weight[...]),
        atol=1e-7)


def _loss_fn(graphdef):
    def loss(params, ids, mask):
        logits = nnx.merge(graphdef, params)(ids, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_saveable"])
def test_remat_policy_gives_same_gradients(policy):
    config = dict(model_type="qwen2", **{**SMALL, "hidden_size": 32, "intermediate_size": 64})
    ids, mask = padded_batch()
    grads = {}
    for p in ("none", policy):
        graphdef, params = nnx.split(models.from_config(config, remat_policy=p), nnx.Param)
        grads[p] = jax.tree_util.tree_leaves(jax.jit(jax.grad(_loss_fn(graphdef)))(params, ids, mask))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in grads["none"])
    for a, b in zip(grads["none"], grads[policy]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy='some'"):
        models.from_config(config, remat_policy="some")


def test_packed_segments_match_separate_rows():
    model = models.from_config(dict(model_type="mistral", **SMALL, sliding_window=3), seed=2)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 128, 5), rng.integers(0, 128, 7)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    fwd = jax.jit(lambda m, ids, seg, pos: m(ids, segment_ids=seg, positions=pos))
    got = np.asarray(fwd(model, packed, segments, positions))[0]
    single = jax.jit(lambda m, ids: m(ids))
    np.testing.assert_allclose(got[:5], np.asarray(single(model, a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(got[5:], np.asarray(single(model, b[None]))[0], atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        model(packed, segment_ids=segments)


def test_hidden_states_and_head_compose_and_bf16_runs():
    model = models.from_config(dict(model_type="gemma2", **SMALL, head_dim=16), seed=0)
    ids, mask = padded_batch()
    split = jax.jit(lambda m, i, a: (m.hidden_states(i, a), m(i, a)))
    h, full = split(model, ids, mask)
    assert h.shape == (3, T, 64)
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(h)), np.asarray(full), atol=1e-6)
    bf16 = models.from_config(dict(model_type="gemma2", **SMALL, head_dim=16), seed=0,
                              dtype=jnp.bfloat16)
    h16, logits = split(bf16, ids, mask)
    assert h16.dtype == jnp.bfloat16
    assert bf16.model.embed_tokens.weight[...].dtype == jnp.float32
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.abs(logits - np.asarray(full)).max() < 0.1


def _compile_seconds(num_layers):
    config = dict(model_type="llama", **{**SMALL, "num_hidden_layers": num_layers})
    graphdef, params = nnx.split(nnx.eval_shape(lambda: models.from_config(config)), nnx.Param)
    ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    fwd = jax.jit(lambda p, i: nnx.merge(graphdef, p)(i))
    start = time.perf_counter()
    fwd.lower(params, ids).compile()
    return time.perf_counter() - start


def test_compile_time_does_not_grow_with_depth():
    _compile_seconds(1)  # warm up tracing caches
    two = min(_compile_seconds(2) for _ in range(2))
    eight = min(_compile_seconds(8) for _ in range(2))
    assert eight < 2 * two, (two, eight)


def test_attention_selection_names_why_cudnn_cannot_run():
    from simpo_jax.models import layers

    assert layers.select_attention("auto", None, jnp.bfloat16) == (
        "cudnn" if jax.default_backend() == "gpu" else "xla")
    assert layers.select_attention("auto", 50.0, jnp.bfloat16) == "xla"  # Gemma 2 soft-capping
    assert layers.select_attention("xla", None, jnp.bfloat16) == "xla"
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' cannot run: the backend is cpu"):
            models.from_config(dict(model_type="llama", vocab_size=32, hidden_size=16,
                                    intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1),
                               attention="cudnn")
    with pytest.raises(ValueError, match="valid: auto, xla, cudnn, splash, flash"):
        layers.select_attention("flash2", None, jnp.bfloat16)
