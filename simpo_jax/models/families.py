"""Hugging Face config.json -> ArchConfig, one small function per supported model_type."""

from __future__ import annotations

import json
from typing import Any

import transformers

import simpo_jax.models.layers as L  # not via the package, which imports this file
from simpo_jax.models.decoder import ArchConfig

ARCHITECTURES = {  # model_type -> transformers class written to config.json "architectures"
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM",
}
# Multimodal model types: we train the language model (this sub-config) only; export writes the
# other towers back unchanged and config.json as it came (models.save_pretrained).
MULTIMODAL = {"gemma3": "text_config"}


def normalize(hf_config: Any, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """A transformers config object from a config or a config.json dict (old rope keys upgraded).

    A model type of ours loads whatever auto_map says (Phi-3.5 and Phi-4-mini name their own code
    files; transformers has phi3). Any other is refused in one line; one whose checkpoint brings
    its own code (auto_map) is refused with trust_remote_code too: we never run checkpoint code.
    """
    if isinstance(hf_config, transformers.PretrainedConfig):
        model_type = hf_config.model_type
        hf_config = hf_config.to_dict()
    else:
        hf_config = dict(hf_config)
        model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        if hf_config.get("auto_map"):
            why = ("trust_remote_code=True, but simpo_jax never runs code shipped with a checkpoint"
                   if trust_remote_code else "that would need the checkpoint's own code "
                   "(auto_map), which simpo_jax never runs, with trust_remote_code or without")
            raise ValueError(f"model_type={model_type!r} is not supported: {why}; supported "
                             f"model types: {supported}.")
        raise ValueError(f"model_type={model_type!r} is not supported; supported model types: "
                         f"{supported}.")
    return transformers.CONFIG_MAPPING[model_type].from_dict(hf_config)


def config_dict(config: transformers.PretrainedConfig) -> dict:
    """The JSON-ready config.json contents (non-default fields, as transformers writes them)."""
    return json.loads(config.to_json_string(use_diff=True))


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if all(isinstance(v, dict) for v in rope.values()):  # per layer type: must all agree
        values = list(rope.values())
        if any(v != values[0] for v in values):
            raise ValueError(f"rope_parameters differ per layer type ({rope}); not supported.")
        rope = values[0]
    return rope


def _rope_fields(config, head_dim: int, rope: dict) -> dict:
    """ArchConfig RoPE fields of one table; longrope adds its long table, switch and scale."""
    fields = dict(inv_freq=tuple(float(x) for x in L.rope_inv_freq(head_dim, rope)))
    if rope.get("rope_type") == "longrope":
        fields.update(
            long_inv_freq=tuple(float(x) for x in L.rope_inv_freq(head_dim, rope, long=True)),
            long_rope_after=int(rope["original_max_position_embeddings"]),
            rope_scale=L.rope_scale(rope, config.max_position_embeddings))
    return fields


def _windows(config, layer_types) -> tuple[int, ...]:
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    if window is None:
        return (L.NO_WINDOW,) * n
    if layer_types is None:
        return (int(window),) * n
    return tuple(int(window) if kind == "sliding_attention" else L.NO_WINDOW
                 for kind in layer_types[:n])


def arch_config(config: transformers.PretrainedConfig) -> ArchConfig:
    """The ArchConfig of a normalised transformers config."""
    if config.model_type in MULTIMODAL:
        # the outer config's tie_word_embeddings decides (transformers ties lm_head by it)
        return _gemma3(getattr(config, MULTIMODAL[config.model_type]), config.model_type,
                       bool(config.tie_word_embeddings))
    if config.model_type == "gemma3_text":
        return _gemma3(config, config.model_type, bool(config.tie_word_embeddings))
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    common = dict(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=float(c.rms_norm_eps),
        **_rope_fields(c, head_dim, _rope(c)),
        tie_word_embeddings=bool(c.tie_word_embeddings),
        initializer_range=float(c.initializer_range))
    if c.model_type == "llama":
        bias = bool(getattr(c, "attention_bias", False))
        return ArchConfig(**common, hidden_act=c.hidden_act, qkv_bias=bias, o_bias=bias,
                          mlp_bias=bool(getattr(c, "mlp_bias", False)),
                          sliding_windows=(L.NO_WINDOW,) * c.num_hidden_layers)
    if c.model_type == "mistral":
        return ArchConfig(**common, hidden_act=c.hidden_act, sliding_windows=_windows(c, None))
    if c.model_type == "qwen2":
        return ArchConfig(**common, hidden_act=c.hidden_act, qkv_bias=True,
                          sliding_windows=_windows(c, getattr(c, "layer_types", None)))
    if c.model_type == "qwen3":  # sliding_window is None unless use_sliding_window
        bias = bool(getattr(c, "attention_bias", False))
        return ArchConfig(**common, hidden_act=c.hidden_act, qkv_bias=bias, o_bias=bias,
                          qk_norm="head", sliding_windows=_windows(c, c.layer_types))
    if c.model_type == "olmo2":
        bias = bool(getattr(c, "attention_bias", False))
        return ArchConfig(**common, hidden_act=c.hidden_act, qkv_bias=bias, o_bias=bias,
                          qk_norm="projection", norm_kind="olmo2", norm_layout="post",
                          sliding_windows=(L.NO_WINDOW,) * c.num_hidden_layers)
    if c.model_type == "phi3":  # fused qkv / gate_up in the checkpoint (hf.FUSED)
        return ArchConfig(**common, hidden_act=c.hidden_act, sliding_windows=_windows(c, None))
    if c.model_type == "gemma2":
        if getattr(c, "use_bidirectional_attention", None):
            raise ValueError("gemma2 use_bidirectional_attention=True is not supported; the "
                             "decoder is causal.")
        bias = bool(getattr(c, "attention_bias", False))
        act = getattr(c, "hidden_activation", None) or c.hidden_act
        return ArchConfig(**common, hidden_act=act, qkv_bias=bias, o_bias=bias,
                          sliding_windows=_windows(c, c.layer_types), norm_kind="gemma",
                          norm_layout="sandwich", scale_embeddings=True,
                          attn_scale=float(c.query_pre_attn_scalar) ** -0.5,
                          attn_softcap=c.attn_logit_softcapping,
                          final_softcap=c.final_logit_softcapping)
    raise AssertionError(c.model_type)


def _gemma3(c, model_type: str, tie_word_embeddings: bool) -> ArchConfig:
    """Gemma 3's language model: Gemma 2's sandwich norms and embedding scale, per-head q/k norm
    instead of attention soft-capping, and per layer type its own RoPE (local base on sliding
    layers, linear scaling on global ones in the 4B-27B checkpoints)."""
    if getattr(c, "use_bidirectional_attention", None):
        raise ValueError("gemma3 use_bidirectional_attention=True is not supported; the decoder "
                         "is causal.")
    head_dim = c.head_dim
    rope = c.rope_parameters
    tables = {kind: L.rope_inv_freq(head_dim, rope[kind]) for kind in sorted(set(c.layer_types))}
    if any(rope[kind].get("rope_type", "default") not in ("default", "linear") for kind in tables):
        raise ValueError(f"gemma3 rope_parameters {rope}: only default and linear RoPE are "
                         "supported.")
    full = tables.get("full_attention", L.rope_inv_freq(head_dim, rope["full_attention"]))
    local = tables.get("sliding_attention")
    bias = bool(getattr(c, "attention_bias", False))
    return ArchConfig(
        model_type=model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=head_dim,
        rms_norm_eps=float(c.rms_norm_eps), inv_freq=tuple(float(x) for x in full),
        local_inv_freq=None if local is None else tuple(float(x) for x in local),
        layer_rope=tuple(int(kind == "sliding_attention" and local is not None)
                         for kind in c.layer_types[:c.num_hidden_layers]),
        tie_word_embeddings=tie_word_embeddings, initializer_range=float(c.initializer_range),
        hidden_act=c.hidden_activation, qkv_bias=bias, o_bias=bias, qk_norm="head",
        sliding_windows=_windows(c, c.layer_types), norm_kind="gemma", norm_layout="sandwich",
        scale_embeddings=True, attn_scale=float(c.query_pre_attn_scalar) ** -0.5,
        attn_softcap=None,  # transformers' Gemma 3 attention ignores attn_logit_softcapping
        # Gemma3ForConditionalGeneration never soft-caps its logits; Gemma3ForCausalLM does
        final_softcap=None if model_type in MULTIMODAL else c.final_logit_softcapping)
