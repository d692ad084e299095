"""Hugging Face import/export: round trips through transformers, shards, bf16, clear errors."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from simpo_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)


def make_hf(path, model_type="llama", **overrides):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    return model


def hf_state(path):
    """{key: float32 numpy} of a saved folder, via transformers (the reference loader)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model, {k: v.float().numpy() for k, v in model.state_dict().items()}


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(0, 96, (2, 9))


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("gemma2", dict(head_dim=8, sliding_window=4)),
    ("qwen3", dict(tie_word_embeddings=True, head_dim=16)),
    ("olmo2", dict(attention_bias=True, eos_token_id=2)),
    ("gemma3_text", dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                         layer_types=["full_attention", "sliding_attention"],
                         rope_parameters={"sliding_attention": dict(rope_theta=10.0),
                                          "full_attention": dict(rope_type="linear",
                                                                 rope_theta=100.0, factor=8.0)})),
    # fused qkv_proj and gate_up_proj: split on import, concatenated again on export
    ("phi3", dict(pad_token_id=0, eos_token_id=2, bos_token_id=1,
                  original_max_position_embeddings=4,
                  rope_parameters=dict(rope_type="longrope", rope_theta=100.0,
                                       partial_rotary_factor=0.75, short_factor=[1.0, 1.5, 2.0],
                                       long_factor=[2.0, 4.0, 8.0]))),
])
def test_round_trip_float32_is_bitwise(tmp_path, model_type, overrides):
    src = make_hf(tmp_path / "src", model_type, **overrides)
    ours = models.from_pretrained(str(tmp_path / "src"))
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets/tiny_tokenizer"))
    models.save_pretrained(ours, str(tmp_path / "out"), tokenizer=tok)
    files = set(os.listdir(tmp_path / "out"))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    original = load_file(str(tmp_path / "src" / "model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(original) == set(exported)
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k], err_msg=k)
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    assert config["dtype"] == "float32" and config["model_type"] == model_type
    reloaded, _ = hf_state(str(tmp_path / "out"))
    np.testing.assert_array_equal(logits_of(reloaded, IDS), logits_of(src, IDS))
    assert np.abs(np.asarray(ours(IDS)) - logits_of(src, IDS)).max() < 1e-4


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    # fused tensors across shards: a shard holds a whole qkv_proj, the index names it
    ("phi3", dict(pad_token_id=0, eos_token_id=2, bos_token_id=1)),
])
def test_small_shards_write_an_index_that_transformers_and_we_load(tmp_path, model_type, overrides):
    src = make_hf(tmp_path / "src", model_type, **overrides)
    ours = models.from_pretrained(str(tmp_path / "src"))
    models.save_pretrained(ours, str(tmp_path / "out"), max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard within the limit unless it holds a single larger tensor
        tensors = load_file(str(tmp_path / "out" / shard))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000
    reloaded, state = hf_state(str(tmp_path / "out"))
    _, ref = hf_state(str(tmp_path / "src"))
    for k in ref:
        np.testing.assert_array_equal(state[k], ref[k], err_msg=k)
    again = models.from_pretrained(str(tmp_path / "out"))  # our loader reads the index too
    np.testing.assert_array_equal(np.asarray(again(IDS)), np.asarray(ours(IDS)))


def test_bfloat16_export_loads_in_transformers(tmp_path):
    make_hf(tmp_path / "src")
    ours = models.from_pretrained(str(tmp_path / "src"))
    models.save_pretrained(ours, str(tmp_path / "out"), dtype="bfloat16")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.dtype == torch.bfloat16
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    for k, v in model.state_dict().items():
        expected = torch.from_numpy(src[k]).bfloat16()  # torch's own fp32 -> bf16 rounding
        assert torch.equal(v, expected), k
    bf16_ours = models.from_pretrained(str(tmp_path / "out"))  # bf16 tensors load too
    assert bf16_ours.model.embed_tokens.weight[...].dtype == np.float32
    assert np.isfinite(np.asarray(bf16_ours(IDS))).all()


def test_unsupported_model_type(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    with pytest.raises(ValueError, match=r"'gpt2'.*gemma2, gemma3, gemma3_text, llama, mistral, "
                                         r"olmo2, phi3, qwen2, qwen3\."):
        models.from_pretrained(str(tmp_path))


def test_checkpoint_code_is_never_run(tmp_path):
    """A model type that needs the checkpoint's own code (auto_map) is refused in one line, with
    trust_remote_code too; a supported type whose config also names code files (Phi-3.5,
    Phi-4-mini) loads with our implementation."""
    custom = {"model_type": "my_arch", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}
    with pytest.raises(ValueError, match=r"'my_arch' is not supported: that would need the "
                                         r"checkpoint's own code \(auto_map\).*supported model "
                                         r"types: gemma2,"):
        models.from_config(custom)
    with pytest.raises(ValueError, match=r"trust_remote_code=True, but simpo_jax never runs code "
                                         r"shipped with a checkpoint; supported model types"):
        models.from_config(custom, trust_remote_code=True)
    make_hf(tmp_path, "phi3", pad_token_id=0, eos_token_id=2, bos_token_id=1)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config",
                          "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    assert models.from_pretrained(str(tmp_path)).arch.model_type == "phi3"


def _edit_checkpoint(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    make_hf(tmp_path)
    key = "model.layers.1.mlp.up_proj.weight"
    original = load_file(str(tmp_path / "model.safetensors"))

    _edit_checkpoint(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"Missing tensor '{key}'.*\(64, 32\)"):
        models.from_pretrained(str(tmp_path))

    _edit_checkpoint(tmp_path, lambda t: t.update({key: original[key], "model.extra.weight": original[key]}))
    with pytest.raises(ValueError, match=r"Unexpected tensor 'model.extra.weight'"):
        models.from_pretrained(str(tmp_path))

    _edit_checkpoint(tmp_path, lambda t: (t.pop("model.extra.weight"), t.update({key: original[key][:, :8]})))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(64, 8\).*expected \(64, 32\)"):
        models.from_pretrained(str(tmp_path))


def test_to_hf_tensors_splits_layers():
    model = models.from_config(dict(model_type="llama", **TINY, tie_word_embeddings=True))
    tensors = models.to_hf_tensors(model)
    assert "lm_head.weight" not in tensors
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.o_proj.weight"],
                                  np.asarray(model.model.layers.self_attn.o_proj.weight[...][1]))
    assert len(tensors) == 1 + 1 + 2 * 9
    assert tensors["model.layers.0.mlp.gate_proj.weight"].dtype == np.float32
