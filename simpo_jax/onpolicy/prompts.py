"""Unique prompts of a config's data, as message lists, and their tokens under a chat template."""

from __future__ import annotations

import hashlib
import json

from simpo_jax.errors import UserError
from simpo_jax.data import formats
from simpo_jax.data.tokenize import truncate_prompt


def prompt_messages(row) -> list | None:
    """The prompt of a row as messages: every turn before the final answer, or the prompt text."""
    if not isinstance(row, dict):
        return None
    for key in ("chosen", "messages"):  # preference / SFT rows: the turns before the last answer
        value = row.get(key)
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            turns = value[:-1] if value[-1].get("role") == "assistant" else value
            if turns and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                             for m in turns):
                return [{"role": m["role"], "content": m["content"]} for m in turns]
    for key in ("prompt", "instruction"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return [{"role": "user", "content": value}]
    return None


def chosen_answer(row: dict) -> str | None:
    """The data's chosen answer of a preference row (a message list's last turn, or text)."""
    value = row.get("chosen") if isinstance(row, dict) else None
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1].get("content") if value[-1].get("role") == "assistant" else None
    return value if isinstance(value, str) else None


def prompt_id(messages: list) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True)
                          .encode()).hexdigest()[:16]


def load(config, role: str) -> list[dict]:
    """Unique prompts {prompt_id, messages, prompt} of one split over config.dataset_mixer.

    role "train": the first split with "train" in its name, the mixer's fraction or count applied;
    role "test": the first with "test" in its name, whole. First occurrence wins.
    """
    names = [s for s in config.dataset_splits if role in s]
    if not names:
        raise UserError(f"config.dataset_splits={list(config.dataset_splits)} names no {role} "
                        "split.")
    mixer = config.dataset_mixer
    mixer = mixer.to_dict() if hasattr(mixer, "to_dict") else dict(mixer)
    out, seen = [], set()
    for name, amount in mixer.items():
        rows = formats.load_split(name, names[0], role=role, cache_dir=config.dataset_cache_dir)
        if rows is None:
            continue
        if role == "train":
            n = int(amount * len(rows)) if amount <= 1 else min(int(amount), len(rows))
            rows = rows.select(range(n)) if hasattr(rows, "select") else rows[:n]
        for row in rows:
            messages = prompt_messages(row)
            if messages is None:
                continue
            pid = prompt_id(messages)
            if pid in seen:
                continue
            seen.add(pid)
            user = [m["content"] for m in messages if m["role"] == "user"]
            out.append({"prompt_id": pid, "messages": messages,
                        "prompt": user[-1] if user else messages[-1]["content"],
                        "chosen": chosen_answer(row)})
    return out


def token_ids(tokenizer, messages: list, max_prompt_length: int, truncation_mode: str):
    """(ids of the chat template with the generation prompt, one leading BOS; truncated?)."""
    if not tokenizer.chat_template:
        raise UserError("The policy's tokenizer has no chat template: set config.chat_template "
                        "(e.g. 'alignment_handbook' or a .jinja file).")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    if bos is not None:
        start = 0
        while start < len(ids) and ids[start] == bos:
            start += 1
        ids = [bos] + ids[start:]
    truncated = len(ids) > max_prompt_length
    return truncate_prompt(ids, max_prompt_length, truncation_mode, bos), truncated
