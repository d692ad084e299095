"""Gemma3ForConditionalGeneration checkpoints (how Gemma 3 4B-27B ship): we train the language
model; logits equal transformers' multimodal class on text, and export writes every other tensor
(vision tower, projector) back bit for bit with config.json as it came."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from simpo_jax import models

T = 12
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            sliding_window=4, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                         "full_attention"],
            rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10.0),
                             "full_attention": dict(rope_type="linear", rope_theta=100.0,
                                                    factor=8.0)})
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14, vision_use_head=False)


def multimodal(path, tie=True, seed=0):
    """A tiny Gemma3ForConditionalGeneration, every tensor jittered, saved by transformers."""
    torch.manual_seed(seed)
    config = transformers.Gemma3Config(
        text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4, image_token_index=120,
        boi_token_index=121, eoi_token_index=122, tie_word_embeddings=tie)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    model.eval().save_pretrained(path)
    return model


def padded_batch(seed=0):
    """Rows: left-padded, right-padded, unpadded (no image tokens: ids below 120)."""
    ids = np.random.default_rng(seed).integers(0, 120, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[0, :3] = 0
    mask[1, 8:] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


def max_error(got, ref, mask):
    return max(float(np.abs(got[r] - ref[r])[mask[r] == 1].max()) for r in range(len(got)))


@pytest.mark.parametrize("tie", [True, False])
def test_language_model_logits_match_transformers(tmp_path, tie):
    hf = multimodal(tmp_path, tie)
    ours = models.from_pretrained(str(tmp_path))
    assert ours.arch.model_type == "gemma3" and ours.arch.tie_word_embeddings == tie
    assert ours.arch.layer_rope == (1, 1, 1, 0)
    ids, mask = padded_batch()
    assert max_error(np.asarray(ours(ids, mask)), hf_logits(hf, ids, mask), mask) < 1e-4


def test_export_carries_untouched_tensors_bitwise_and_loads_as_same_class(tmp_path):
    src = tmp_path / "src"
    hf = multimodal(src, tie=False)
    original = load_file(str(src / "model.safetensors"))
    # the vision tower stored in bfloat16, the language model in float32: carried as stored
    for k in [k for k in original if k.startswith("vision_tower.")]:
        original[k] = original[k].astype("bfloat16")
    save_file(original, str(src / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32)
    hf.config.text_config._attn_implementation = "eager"
    with open(src / "config.json") as f:
        config_in = json.load(f)

    ours = models.from_pretrained(str(src))
    with pytest.raises(ValueError, match="overwrite the checkpoint"):
        models.save_pretrained(ours, str(src))
    models.save_pretrained(ours, str(tmp_path / "out"), max_shard_size="40KB")
    out = {}
    for name in os.listdir(tmp_path / "out"):
        if name.endswith(".safetensors"):
            out.update(load_file(str(tmp_path / "out" / name)))
    assert set(out) == set(original)
    untouched = [k for k in original if not k.startswith("language_model.")]
    assert any(k.startswith("vision_tower.") for k in untouched)
    assert any(k.startswith("multi_modal_projector.") for k in untouched)
    for k in original:  # float32 export of float32 weights: all bitwise, carried ones as stored
        assert out[k].dtype == original[k].dtype, k
        np.testing.assert_array_equal(out[k].view(np.uint8), original[k].view(np.uint8), err_msg=k)
    with open(tmp_path / "out" / "config.json") as f:
        config_out = json.load(f)
    assert config_out == {**config_in, "dtype": "float32"}

    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(
        str(tmp_path / "out"), dtype=torch.float32)
    assert type(reloaded) is transformers.Gemma3ForConditionalGeneration
    reloaded.config.text_config._attn_implementation = "eager"
    ids, mask = padded_batch(1)
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask))
    vision = {k: v for k, v in reloaded.state_dict().items() if "vision_tower" in k}
    assert vision and all(v.dtype == torch.float32 for v in vision.values())


def test_in_memory_key_layout_loads_and_exports_in_kind(tmp_path):
    """Keys as transformers 5 holds them (model.language_model.*, model.vision_tower.*) load too;
    export keeps the checkpoint's own layout."""
    hf = multimodal(tmp_path / "src")
    legacy = load_file(str(tmp_path / "src" / "model.safetensors"))
    renamed = {}
    for k, v in legacy.items():
        k = k.replace("language_model.model.", "model.language_model.")
        k = "model." + k if k.startswith(("vision_tower.", "multi_modal_projector.")) else k
        renamed[k] = v
    save_file(renamed, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    ours = models.from_pretrained(str(tmp_path / "src"))
    ids, mask = padded_batch()
    assert max_error(np.asarray(ours(ids, mask)), hf_logits(hf, ids, mask), mask) < 1e-4
    models.save_pretrained(ours, str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(renamed)
    for k in renamed:
        np.testing.assert_array_equal(out[k], renamed[k], err_msg=k)


def test_export_needs_the_source_checkpoint(tmp_path):
    multimodal(tmp_path / "src")
    with open(tmp_path / "src" / "config.json") as f:
        config = json.load(f)
    model = models.from_config(config)
    assert model.arch.model_type == "gemma3" and model.hf_config_dict == config
    with pytest.raises(ValueError, match="needs the checkpoint it was loaded from"):
        models.save_pretrained(model, str(tmp_path / "out"))
    # a restored training run builds from config.json, naming the folder the weights came from
    restored = models.from_config(config, source=str(tmp_path / "src"))
    models.save_pretrained(restored, str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert set(out) == set(src)
    np.testing.assert_array_equal(out["multi_modal_projector.mm_input_projection_weight"],
                                  src["multi_modal_projector.mm_input_projection_weight"])


def test_unknown_language_model_tensor_is_still_unexpected(tmp_path):
    multimodal(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["language_model.model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="Unexpected tensor 'language_model.model.extra.weight'"):
        models.from_pretrained(str(tmp_path))


SHIPPED = ("google/gemma-3-12b-it", "google/gemma-3-4b-it", "microsoft/Phi-4-mini-instruct",
           "microsoft/Phi-3.5-mini-instruct", "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_planner_configs_have_transformers_parameter_counts(name):
    """assets/model_configs copies of the real sizes: our parameters (the language model of a
    multimodal checkpoint) number exactly what transformers builds from the same config.json."""
    import jax
    from flax import nnx

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "model_configs", name.replace("/", "__") + ".json")
    with open(path) as f:
        config = json.load(f)
    ours = nnx.eval_shape(lambda: models.from_config(config))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        if config["model_type"] == "gemma3":
            reference = transformers.Gemma3ForConditionalGeneration(hf_config)
        else:
            reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    named = dict(reference.named_parameters(remove_duplicate=True))
    expected = sum(p.numel() for k, p in named.items()
                   if "vision_tower" not in k and "multi_modal_projector" not in k)
    assert count == expected, (count, expected)
    if config["model_type"] == "phi3":  # longrope, short factors below 4096 positions
        assert ours.arch.long_rope_after == 4096 and ours.arch.rope_scale > 1.0
    if config["model_type"] == "gemma3":  # 5 local : 1 global, local base 10k
        assert ours.arch.layer_rope[:6] == (1, 1, 1, 1, 1, 0)
        assert ours.arch.local_inv_freq[1] == pytest.approx(10000.0 ** (-2 / 256))
        assert ours.arch.inv_freq[1] == pytest.approx(1e6 ** (-2 / 256) / 8)
