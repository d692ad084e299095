"""Greedy KV-cached generation equals transformers' greedy `generate` for the same weights."""

import numpy as np
import pytest
import torch
import transformers

from simpo_jax import models
from simpo_jax.models import generate


def hf_model(tmp_path, family):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=5,
                                                                           **common))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=24, **common))
    elif family == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
    elif family in ("gemma3_text", "gemma3"):
        text = transformers.Gemma3TextConfig(
            head_dim=16, sliding_window=5, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": dict(rope_theta=10.0),
                             "full_attention": dict(rope_type="linear", rope_theta=100.0,
                                                    factor=4.0)}, **common)
        if family == "gemma3_text":
            model = transformers.Gemma3ForCausalLM(text)
        else:  # the multimodal class, text only (it does not soft-cap its logits)
            model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
                text_config=text.to_dict(), mm_tokens_per_image=4, image_token_index=94,
                boi_token_index=95, eoi_token_index=96,
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=28, patch_size=14)))
    elif family == "phi3_longrope":
        # 12 of 16 dims rotated; longrope switches to the long factors at the 11th token, where
        # transformers re-encodes the whole sequence (its cache holds short-factor keys)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            original_max_position_embeddings=10, max_position_embeddings=64,
            rope_parameters=dict(rope_type="longrope", rope_theta=100.0, partial_rotary_factor=0.75,
                                 short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                                 long_factor=[1.0, 1.5, 2.5, 4.0, 7.0, 12.0]), **common))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            head_dim=16, sliding_window=5, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, query_pre_attn_scalar=16, **common))
    with torch.no_grad():  # sharper distributions, so greedy paths are not decided by noise
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(tmp_path / family)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"] + [
    pytest.param(f, marks=pytest.mark.slow)
    for f in ("mistral", "gemma2", "olmo2", "gemma3_text", "phi3_longrope")])
def test_greedy_matches_transformers(tmp_path, family):
    hf = hf_model(tmp_path, family)
    ours = models.from_pretrained(str(tmp_path / family))
    prompts = [[1, 5, 17, 33, 8, 9, 41], [1, 60, 7], [1, 11, 12, 13, 14]]
    new = 12
    got = generate.greedy_generate(ours, prompts, max_new_tokens=new, eos_token_id=2,
                                   pad_token_id=0)
    ids, mask = generate.left_pad(prompts, 0)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = ref[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=0)
    np.testing.assert_array_equal(got, ref)
    assert len({tuple(r) for r in got}) > 1  # not a degenerate constant output
