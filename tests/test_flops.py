"""Model FLOPs per token for MFU: the documented count on a known architecture."""

from simpo_jax import flops, models

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000)


def test_llama2_7b_counts():
    arch, _ = models.arch_from_hf_config(LLAMA2_7B)
    # 32 layers x (4 attention projections 4096^2 + 3 MLP 4096x11008) + LM head 32000x4096
    assert flops.non_embedding_params(arch) == 6_607_077_376
    per_token = flops.model_flops_per_token(arch, seq_len=2048)
    assert per_token == 6 * 6_607_077_376 + 12 * 32 * 2048 * 4096


def test_peak_is_positive_on_this_host():
    peak, source = flops.peak_flops_per_device()
    assert peak > 1e8 and source
