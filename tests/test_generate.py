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
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            head_dim=16, sliding_window=5, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, query_pre_attn_scalar=16, **common))
    with torch.no_grad():  # sharper distributions, so greedy paths are not decided by noise
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(tmp_path / family)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
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
