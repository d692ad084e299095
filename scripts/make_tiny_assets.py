"""Builds the tiny shipped assets: a byte-level BPE chat tokenizer and a copy-rule preference set.

Deterministic (seeded, no network); the files in assets/ are this script's output, byte for byte.

Run: python scripts/make_tiny_assets.py [--out assets]
"""

import argparse
import hashlib
import itertools
import json
import os
import random

SEED = 1234
VOCAB_SIZE = 512  # configs/tiny.py: model_init.vocab_size
NUM_TRAIN, NUM_TEST = 3000, 300
# Ids 0, 1, 2 match configs/tiny.py (pad_token_id, bos_token_id, eos_token_id).
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Zephyr-like. Starts with the BOS token; the tokenizer itself adds no special tokens, so a
# rendered conversation tokenized with add_special_tokens=False has exactly one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS = """
apple river green house music table window garden yellow orange silver winter summer
bread water light stone cloud paper chair horse flower school money night morning
happy little small large quick slow bright dark tiger rabbit mouse cat dog bird fish
ocean mountain forest desert island bridge street city village farm market doctor
teacher student friend family mother father sister brother child baby king queen
pencil book letter story song dance game ball sport team player road train plane
boat car truck bicycle engine machine computer phone camera picture color circle
square triangle number lemon cherry grape banana potato tomato carrot onion pepper
sugar salt honey butter cheese milk coffee tea juice soup rice egg cake cookie candy
shoe shirt jacket hat glove ring watch clock candle lamp mirror door floor wall roof
kitchen bedroom garden sun moon star planet rain snow wind storm thunder fire ice
gold iron glass wood rock sand hill valley lake beach wave shell pearl button ribbon
""".split()
WORDS = sorted(set(WORDS))

PROMPTS = [
    "Please repeat the word: {word}",
    "Repeat after me: {word}",
    "Say the word {word}.",
    "Echo this word back: {word}",
]


def make_rows(rng: random.Random) -> tuple[list, list]:
    """Train and test rows; every test (prompt, rejected) combination is absent from train."""
    combos = [(p, c, r) for p, c, r in itertools.product(PROMPTS, WORDS, WORDS) if c != r]
    picked = rng.sample(combos, NUM_TRAIN + NUM_TEST)
    return ([_row(rng, *x) for x in picked[:NUM_TRAIN]],
            [_row(rng, *x) for x in picked[NUM_TRAIN:]])


def _row(rng: random.Random, phrasing: str, chosen: str, rejected: str) -> dict:
    prompt = phrasing.format(word=chosen)
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "score_chosen": float(rng.choice([8.0, 9.0, 10.0])),
        "score_rejected": float(rng.choice([1.0, 2.0, 3.0])),
    }


def write_jsonl(path: str, rows: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def render(messages: list, add_generation_prompt: bool = False) -> str:
    """The chat template, in Python, for the tokenizer's training text only."""
    text = "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def make_tokenizer(texts: list):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        model_max_length=2048, clean_up_tokenization_spaces=False)


def main(out: str) -> None:
    rng = random.Random(SEED)
    train, test = make_rows(rng)
    prefs_dir = os.path.join(out, "tiny_prefs")
    os.makedirs(prefs_dir, exist_ok=True)
    write_jsonl(os.path.join(prefs_dir, "train_prefs.jsonl"), train)
    write_jsonl(os.path.join(prefs_dir, "test_prefs.jsonl"), test)

    texts = [render(r[k]) for r in train for k in ("chosen", "rejected")]
    texts += [render([{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": w}], add_generation_prompt=True) for w in WORDS]
    tokenizer = make_tokenizer(texts)
    tokenizer.save_pretrained(os.path.join(out, "tiny_tokenizer"))
    print(f"wrote {len(train)} train / {len(test)} test pairs and a {len(tokenizer)}-token "
          f"tokenizer under {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "assets"), help="folder that receives tiny_tokenizer/ and tiny_prefs/")
    main(parser.parse_args().out)
