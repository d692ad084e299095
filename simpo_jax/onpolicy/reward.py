"""Reward models: a Hugging Face *ForSequenceClassification checkpoint as our decoder + its score head.

Parameter paths are the checkpoint's keys (`model.*` stacked as in models/, `score.weight`
[num_labels, hidden], no bias), so the import is the models' own streamed loader (hf.load_state).
A text's score is the score head at its last real token, found as transformers does: the rightmost
token that is not pad_token_id (any padding side), or the last token when the config has no pad
token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simpo_jax import sharding as sharding_lib
from simpo_jax.errors import UserError
from simpo_jax.models import arch_from_hf_config, hf
from simpo_jax.models import layers as L
from simpo_jax.models.decoder import CausalLM

log = logging.getLogger(__name__)

# model_type -> the transformers class of its reward models: the families whose checkpoints keep
# one tensor per projection (hf.load_state's plain layout; not phi3's fused ones), each tested
# against transformers in tests/test_onpolicy.py.
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
    "olmo2": "Olmo2ForSequenceClassification",
}
STANDARD_REWARD_MODELS = ("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
                          "Skywork/Skywork-Reward-Gemma-2-27B-v0.2", "weqweasdas/RM-Mistral-7B")


class RewardModel(CausalLM):
    """HF `model` (the policy's decoder) and `score`, no LM head; call: scores [B, num_labels]
    in float32."""

    def __init__(self, arch, hf_config_dict: dict, num_labels: int, pad_token_id, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0):
        # tie_word_embeddings=True only stops CausalLM from making an lm_head it does not need.
        super().__init__(dataclasses.replace(arch, tie_word_embeddings=True), hf_config_dict,
                         dtype=dtype, param_dtype=param_dtype, seed=seed)
        self.score = L.Linear(arch.hidden_size, num_labels, bias=False, layers=None,
                              std=arch.initializer_range, dtype=dtype, param_dtype=param_dtype,
                              rngs=nnx.Rngs(seed + 1))
        self.pad_token_id = pad_token_id

    def last_token_index(self, input_ids_BT, attention_mask_BT):
        """transformers' rule: the rightmost non-pad token; without a pad token, the last real one."""
        t = input_ids_BT.shape[1]
        if self.pad_token_id is None:
            real = attention_mask_BT.astype(jnp.int32)
        else:
            real = (input_ids_BT != self.pad_token_id).astype(jnp.int32)
        return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * real, axis=-1)

    def __call__(self, input_ids_BT, attention_mask_BT):
        h_BTD = self.hidden_states(input_ids_BT, attention_mask_BT)
        last_B = self.last_token_index(input_ids_BT, attention_mask_BT)
        h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
        return self.score(h_BD, preferred_element_type=jnp.float32)


def check_config(config: dict, where: str) -> None:
    """UserError unless config.json describes a standard sequence-classification model we run."""
    names = ", ".join(STANDARD_REWARD_MODELS)
    architectures = config.get("architectures") or []
    if config.get("auto_map") or any(a not in ARCHITECTURES.values() for a in architectures):
        what = (f"needs custom code (auto_map: {sorted(config['auto_map'])})"
                if config.get("auto_map") else f"is a {', '.join(architectures)}")
        raise UserError(f"{where} {what}; simpo_jax runs only standard transformers reward models "
                        f"({', '.join(sorted(set(ARCHITECTURES.values())))}) in JAX and never "
                        f"runs code shipped with a checkpoint. Standard ones: {names}.")
    if config.get("model_type") not in ARCHITECTURES:
        raise UserError(f"{where}: model_type={config.get('model_type')!r} is not supported; "
                        f"supported: {', '.join(sorted(ARCHITECTURES))}. Standard reward models: "
                        f"{names}.")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise UserError(f"{where} has {labels} labels; a reward model has one (a scalar score).")


def from_pretrained(path: str, *, mesh=None, dtype=jnp.float32, where: str = "") -> RewardModel:
    """Loads a local HF sequence-classification folder, tensor by tensor, into `mesh` shardings."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    check_config(config, where or path)
    arch, config_dict = arch_from_hf_config(config)
    pad = config.get("pad_token_id")
    build = lambda: RewardModel(arch, config_dict, 1, pad, dtype=dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = sharding_lib.placement(mesh, abstract)
    try:  # exactly the checkpoint's keys: `model.*` as the policy's, `score.weight`, no LM head
        state = hf.load_state(path, abstract, shardings, arch.num_layers,
                              tie_word_embeddings=False, model_type=arch.model_type)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{where or path}: {e} Not a sequence-classification checkpoint of this "
                        "architecture.") from None
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scores(state, ids_BT, mask_BT, *, graphdef):
    return nnx.merge(graphdef, state)(ids_BT, mask_BT)[:, 0]


def bucket(length: int, smallest: int = 16) -> int:
    """A padded length: the next power of two (few compiled shapes)."""
    return max(smallest, 1 << (max(length, 1) - 1).bit_length())


def score_ids(model: RewardModel, sequences, *, batch_size: int, mesh=None,
              pad_side: str = "right") -> np.ndarray:
    """Scores [N] (float32) of token lists, batched by length with padding on `pad_side`."""
    pad = model.pad_token_id if model.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-batch_size // dp) * dp
    graphdef, state = nnx.split(model)
    out = np.zeros(len(sequences), np.float32)
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        seqs = [sequences[i] for i in chunk]
        seqs += [seqs[0]] * (rows - len(seqs))
        t = bucket(max(len(s) for s in seqs))
        ids = np.full((rows, t), pad, np.int32)
        mask = np.zeros((rows, t), np.int32)
        for r, s in enumerate(seqs):
            where = slice(0, len(s)) if pad_side == "right" else slice(t - len(s), t)
            ids[r, where], mask[r, where] = s, 1
        arrays = (ids, mask)
        if mesh is not None:
            arrays = tuple(jax.make_array_from_callback(
                a.shape, sharding_lib.batch_sharding(mesh, 2), lambda idx, a=a: a[idx])
                for a in arrays)
        scores = _scores(state, *arrays, graphdef=graphdef)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            scores = multihost_utils.process_allgather(scores, tiled=True)
        out[chunk] = np.asarray(scores)[:len(chunk)]
    return out


def conversation_ids(tokenizer, prompt_messages: list, answer: str) -> list[int]:
    """The reward model's chat template over [*prompt, assistant: answer], as token ids."""
    text = tokenizer.apply_chat_template(
        list(prompt_messages) + [{"role": "assistant", "content": answer}], tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(path: str, where: str):
    """The reward model's own tokenizer; it must have a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise UserError(f"{where}: the reward model's tokenizer has no chat template, so answers "
                        "cannot be formatted as it was trained; use a reward model that ships one.")
    return tokenizer
