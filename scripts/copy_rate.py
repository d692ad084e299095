"""Copy rate of the tiny task: how often a greedy sample is exactly the word its prompt asks for.

The tiny data set asks for one word back ("Echo this word back: water" -> "water"); a sample
counts as a copy when its completion, stripped of whitespace, is that word and nothing else.

Run: python scripts/copy_rate.py outputs/tiny   (copy rate of samples.jsonl at every eval step)
"""

import argparse
import json
import os
import re

USER_MESSAGE = re.compile(r"<\|user\|>\n(.*?)</s>", re.S)
WORD = re.compile(r"[A-Za-z]+")


def requested_word(prompt: str) -> str:
    """The word a tiny-task prompt asks for: the last word of its (last) user message."""
    messages = USER_MESSAGE.findall(prompt)
    words = WORD.findall(messages[-1] if messages else prompt)
    if not words:
        raise ValueError(f"no word to copy in prompt {prompt!r}")
    return words[-1]


def is_copy(prompt: str, completion: str) -> bool:
    return completion.strip() == requested_word(prompt)


def copy_rate(samples: list[dict]) -> float:
    """Fraction of samples ({"prompt", "completion"}) whose completion is the requested word."""
    if not samples:
        raise ValueError("copy_rate of no samples")
    return sum(is_copy(s["prompt"], s["completion"]) for s in samples) / len(samples)


def samples_by_step(output_dir: str) -> dict[int, list[dict]]:
    """{eval step: its rows} of <output_dir>/samples.jsonl."""
    by_step: dict[int, list] = {}
    with open(os.path.join(output_dir, "samples.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], []).append(row)
    return dict(sorted(by_step.items()))


def copy_rates_by_step(output_dir: str) -> dict[int, float]:
    """{eval step: copy rate} of <output_dir>/samples.jsonl."""
    return {step: copy_rate(rows) for step, rows in samples_by_step(output_dir).items()}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A one-turn user prompt, chat-templated with the assistant header, as the data pipeline does."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, new_ids) -> str:
    """New tokens as simpo_jax.evaluation writes a sample: up to EOS, special tokens skipped."""
    new_ids = list(map(int, new_ids))
    eos = tokenizer.eos_token_id
    return tokenizer.decode(new_ids[:new_ids.index(eos)] if eos in new_ids else new_ids,
                            skip_special_tokens=True)


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy (KV-cached) completions of user prompts by an NNX model, as samples.jsonl holds them."""
    from simpo_jax.models import generate

    out = generate.greedy_generate(model, [prompt_ids(tokenizer, p) for p in prompts],
                                   max_new_tokens=max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    return [decode(tokenizer, new) for new in out]


def model_copy_rate(model, tokenizer, prompts: list[str]) -> float:
    """Copy rate of a model's greedy completions of user prompts."""
    completions = greedy_completions(model, tokenizer, prompts)
    return copy_rate([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a tiny run's output_dir (holds samples.jsonl)")
    args = parser.parse_args()
    for step, rows in samples_by_step(args.output_dir).items():
        print(f"step {step:>5}: copy rate {copy_rate(rows):.0%} of {len(rows)} samples")


if __name__ == "__main__":
    main()
