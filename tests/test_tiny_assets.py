"""The shipped tiny assets (tokenizer, preference sets, SFT base): load offline, right schema,
reproducible."""

import filecmp
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from scripts import copy_rate, make_tiny_assets, make_tiny_sft_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer")
SFT = os.path.join(ASSETS, "tiny_sft")
ONPOLICY = os.path.join(ASSETS, "tiny_prefs_onpolicy")
# sha256 of assets/tiny_sft/model.safetensors as scripts/make_tiny_sft_model.py wrote it (2 CPU
# cores, AMD EPYC; a rebuild there reproduced it byte for byte). Rebuild and update together.
SFT_WEIGHTS_SHA256 = "fcd4dce8621a5ead98b510e1272c8ed0fa1256d04f7823bcdfc351fd15f21cdb"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def _rows(split, folder="tiny_prefs"):
    with open(os.path.join(ASSETS, folder, f"{split}_prefs.jsonl"), encoding="utf-8") as f:
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


@pytest.mark.slow
def test_script_reproduces_shipped_files(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_assets.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for sub in ("tiny_tokenizer", "tiny_prefs"):
        shipped = sorted(os.listdir(os.path.join(ASSETS, sub)))
        assert sorted(os.listdir(tmp_path / sub)) == shipped
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(ASSETS, sub), tmp_path / sub,
                                                   shipped, shallow=False)
        assert (mismatch, errors) == ([], []), f"{sub}: regenerate with scripts/make_tiny_assets.py"


# --- The SFT base (scripts/make_tiny_sft_model.py) and its on-policy pairs --------------------------

@pytest.mark.slow
def test_sft_base_loads_in_transformers_and_matches_ours():
    import torch
    import transformers

    from simpo_jax import models

    tok = AutoTokenizer.from_pretrained(SFT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(SFT)
    ours = models.from_pretrained(SFT)
    prompts = ["Please repeat the word: doctor", "Say the word storm.", "Copy this word: zebra"]
    ids = [copy_rate.prompt_ids(tok, p) for p in prompts]
    width = max(map(len, ids))
    ids = np.array([x + [tok.eos_token_id] * (width - len(x)) for x in ids])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), ref, atol=1e-4)
    # transformers' greedy generate gives the answers our eval samples hold.
    one = torch.tensor([copy_rate.prompt_ids(tok, prompts[0])])
    gen = hf.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=8, do_sample=False,
                      pad_token_id=tok.pad_token_id)
    assert copy_rate.decode(tok, gen[0, one.shape[1]:]) == copy_rate.greedy_completions(
        ours, tok, prompts[:1])[0]


def test_sft_base_is_small_with_the_shipped_tokenizer():
    files = sorted(os.listdir(SFT))
    assert files == ["chat_template.jinja", "config.json", "generation_config.json",
                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in make_tiny_sft_model.TOKENIZER_FILES:
        assert filecmp.cmp(os.path.join(SFT, name), os.path.join(TOKENIZER, name), shallow=False)
    assert sum(os.path.getsize(os.path.join(SFT, f)) for f in files) < 1_000_000
    with open(os.path.join(SFT, "model.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SFT_WEIGHTS_SHA256, (
            "assets/tiny_sft changed: rebuild it with scripts/make_tiny_sft_model.py and record "
            "the new hash here")


@pytest.mark.slow
def test_sft_base_follows_the_instruction_only_partly():
    from simpo_jax import models

    tok = AutoTokenizer.from_pretrained(SFT)
    rate = copy_rate.model_copy_rate(models.from_pretrained(SFT), tok,
                                     [r["prompt"] for r in _rows("test")])
    assert 0.2 <= rate <= 0.5, rate  # SimPO has something visible to improve


def test_sft_data_shares_no_word_or_phrasing_with_the_preference_set(tokenizer):
    rows = make_tiny_sft_model.sft_rows(tokenizer)
    assert len(rows) == len(make_tiny_sft_model.SFT_WORDS) + make_tiny_sft_model.NUM_PSEUDO_WORDS
    pref_words = set(make_tiny_assets.WORDS)
    assert not {word for _, word in rows} & pref_words
    phrasings = {p.replace(w, "{word}") for p, w in rows}
    assert len(phrasings) > 1000 and not phrasings & set(make_tiny_assets.PROMPTS)
    for verb in ("repeat", "say", "echo"):  # the preference set's instructions
        assert not any(verb in p.lower().split() for p in phrasings), verb
    assert all(p.endswith((w, w + ".", w + "?", w + " again.")) for p, w in rows)


def test_onpolicy_pairs_are_tiny_prefs_with_the_base_s_mistakes_rejected():
    for split, kept in (("train", 2993), ("test", 300)):
        pairs, source = _rows(split, "tiny_prefs_onpolicy"), _rows(split)
        assert len(pairs) == kept
        by_prompt = {}
        for row in source:
            by_prompt.setdefault(row["prompt"], row)
        for row in pairs:
            original = by_prompt[row["prompt"]]
            assert set(row) == set(original) and row["prompt_id"] == original["prompt_id"]
            assert row["chosen"] == original["chosen"]
            assert row["rejected"][0] == original["rejected"][0]
            rejected = row["rejected"][1]["content"]
            assert rejected and rejected != row["chosen"][1]["content"]
            assert row["score_chosen"] > row["score_rejected"]
    # The rows keep tiny_prefs' order (a few train rows dropped), and no test pair is trained on.
    train, test = _rows("train", "tiny_prefs_onpolicy"), _rows("test", "tiny_prefs_onpolicy")
    assert [r["prompt"] for r in test] == [r["prompt"] for r in _rows("test")]
    pairs = lambda rows: {(r["prompt"], r["rejected"][1]["content"]) for r in rows}
    assert not pairs(test) & pairs(train)
    size = sum(os.path.getsize(os.path.join(ONPOLICY, f"{s}_prefs.jsonl")) for s in ("train", "test"))
    assert size < 2_000_000


@pytest.mark.slow
def test_sft_training_is_deterministic(tokenizer):
    from flax import nnx

    runs = [nnx.state(make_tiny_sft_model.train(tokenizer, steps=5), nnx.Param) for _ in range(2)]
    import jax

    jax.tree.map(np.testing.assert_array_equal, *runs)


@pytest.mark.slow
def test_onpolicy_script_reproduces_shipped_pairs(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_onpolicy_prefs.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    names = ["test_prefs.jsonl", "train_prefs.jsonl"]
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(ONPOLICY)) == names
    match, mismatch, errors = filecmp.cmpfiles(ONPOLICY, tmp_path, names, shallow=False)
    assert (mismatch, errors) == ([], []), "regenerate with scripts/make_tiny_onpolicy_prefs.py"
