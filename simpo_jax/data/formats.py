"""What a row means: its format detected, normalised to a preference pair, or read as a prompt."""

from __future__ import annotations

import hashlib
import json

from simpo_jax.config.choices import DataFormat
from simpo_jax.errors import UserError

FORMATS = DataFormat.values()


class BadRow(Exception):
    """A row that cannot become a preference pair; `reason` is the report's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def detect_format(rows, data_format: str) -> str:
    """The format of a split from the columns and types of its first rows, unless given."""
    if data_format != "auto":
        if data_format not in FORMATS:
            raise UserError(f"data_format={data_format!r}; valid: {', '.join(FORMATS)}.")
        return data_format
    sample = [r for _, r in zip(range(100), rows) if isinstance(r, dict)]
    keys = set().union(*[r.keys() for r in sample]) if sample else set()
    if {"instruction", "chosen_response", "rejected_response"} <= keys:
        return "distilabel_math"
    first = next((r.get("chosen") for r in sample if r.get("chosen") is not None), None)
    if isinstance(first, list):
        return "ultrafeedback" if "prompt" in keys else "messages"
    if isinstance(first, str):
        return "plain"
    raise UserError(f"Cannot detect the data format from columns {sorted(keys)}; set data_format "
                    f"to one of {', '.join(FORMATS[1:])}.")


def normalise(row, data_format: str) -> dict:
    """A row -> {"chat": bool, "prompt": messages (chat) or text, "chosen": text, "rejected": text}.

    Raises BadRow. Chat rows keep every turn before the final assistant message as the prompt.
    """
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is a {type(row).__name__}")
    if data_format == "distilabel_math":
        prompt = _text(row, "instruction")
        out = dict(chat=True, prompt=[{"role": "user", "content": prompt}],
                   chosen=_text(row, "chosen_response"), rejected=_text(row, "rejected_response"))
    elif data_format == "plain":
        out = dict(chat=False, prompt=_text(row, "prompt"), chosen=_text(row, "chosen"),
                   rejected=_text(row, "rejected"))
    else:  # ultrafeedback / messages: message lists, the prompt possibly absent
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise BadRow("mismatched_turns")
        prompt = chosen[:-1]
        if not prompt:
            prompt = _prompt_messages(row)
        out = dict(chat=True, prompt=prompt, chosen=chosen[-1]["content"],
                   rejected=rejected[-1]["content"])
    if out["chosen"] == out["rejected"]:
        raise BadRow("identical_chosen_rejected")
    return out


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", key)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{key} is a {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_text", key)
    return value


def _messages(row: dict, key: str) -> list:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", key)
    if not isinstance(value, list) or not value:
        raise BadRow("wrong_type" if not isinstance(value, list) else "empty_text", key)
    messages = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise BadRow("wrong_type", f"{key} holds a message without string role and content")
        if not m["content"].strip():
            raise BadRow("empty_text", key)
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "assistant":
        raise BadRow("wrong_type", f"the last {key} message is not from the assistant")
    return messages


def _prompt_messages(row: dict) -> list:
    """The prompt when chosen/rejected hold only the assistant reply: a string or a message list."""
    prompt = row.get("prompt")
    if prompt is None:
        raise BadRow("missing_field", "prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("empty_text", "prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return _messages({"prompt": prompt + [{"role": "assistant", "content": "x"}]}, "prompt")[:-1]
    raise BadRow("wrong_type", f"prompt is a {type(prompt).__name__}")


# --- Prompts of on-policy generation: more lenient than normalise (SFT rows, bare prompts) ------

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
