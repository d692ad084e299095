"""The shipped tiny tokenizer and preference set: load offline, right schema, reproducible."""

import filecmp
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def _rows(split):
    with open(os.path.join(ASSETS, "tiny_prefs", f"{split}_prefs.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_tokenizer_special_tokens(tokenizer):
    # configs/tiny.py: vocab_size 512, pad 0, bos 1, eos 2.
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for marker in ("<|user|>", "<|assistant|>", "<|system|>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1
    # The tokenizer adds no BOS itself: the chat template carries it.
    assert tokenizer.encode("apple")[0] != tokenizer.bos_token_id


def test_chat_template_renders(tokenizer):
    messages = [{"role": "user", "content": "Please repeat the word: apple"},
                {"role": "assistant", "content": "apple"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s><|user|>\nPlease repeat the word: apple</s>\n<|assistant|>\napple</s>\n")
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>\nPlease repeat the word: apple</s>\n<|assistant|>\n")
    assert tokenizer.chat_template.startswith("{{ bos_token }}")


@pytest.mark.parametrize("text", ["Please repeat the word: apple", "Hello, world! 123 ünïcödé",
                                  "<s><|user|>\nx</s>\n<|assistant|>\ny</s>\n"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_prefs_schema_and_sizes():
    train, test = _rows("train"), _rows("test")
    assert (len(train), len(test)) == (3000, 300)
    for row in train + test:
        assert set(row) == {"prompt", "prompt_id", "chosen", "rejected", "score_chosen",
                            "score_rejected"}
        user = {"role": "user", "content": row["prompt"]}
        assert row["chosen"][0] == user and row["rejected"][0] == user
        assert [m["role"] for m in row["chosen"]] == ["user", "assistant"] == [
            m["role"] for m in row["rejected"]]
        chosen, rejected = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert row["prompt"].rstrip(".").endswith(chosen) and chosen != rejected
        assert row["score_chosen"] > row["score_rejected"]
    seen = {(r["prompt"], r["rejected"][1]["content"]) for r in train}
    assert not seen & {(r["prompt"], r["rejected"][1]["content"]) for r in test}
    size = sum(os.path.getsize(os.path.join(ASSETS, "tiny_prefs", f"{s}_prefs.jsonl"))
               for s in ("train", "test"))
    assert size < 2_000_000


def test_script_reproduces_shipped_files(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_assets.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for sub in ("tiny_tokenizer", "tiny_prefs"):
        shipped = sorted(os.listdir(os.path.join(ASSETS, sub)))
        assert sorted(os.listdir(tmp_path / sub)) == shipped
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(ASSETS, sub), tmp_path / sub,
                                                   shipped, shallow=False)
        assert (mismatch, errors) == ([], []), f"{sub}: regenerate with scripts/make_tiny_assets.py"
