"""Builds the tiny instruction-tuned base that configs/tiny.py aligns: SFT of a 2-layer Llama.

A practitioner starts SimPO from a model that already follows instructions (an "-Instruct" or
SFT checkpoint), not from random weights. This script makes the tiny equivalent: supervised
fine-tuning of a randomly initialised 2-layer, 64-wide Llama on prompt -> response pairs of the
copy task family, rendered with the shipped chat template, loss on the response tokens only.
Its words and phrasings are disjoint from every word and phrasing in assets/tiny_prefs (the
responses are real and made-up words built from the tokenizer's pieces; the instructions use none
of the preference set's verbs), so what the base does on those prompts is generalisation. Training
stops early on purpose (STEPS), when it copies the requested word for about a third of the
tiny_prefs test prompts: SimPO then has something visible to improve.

Deterministic on a given machine (fixed seeds, CPU, no network); assets/tiny_sft is this script's
output (about 3 minutes on 2 CPU cores).

Run: python scripts/make_tiny_sft_model.py [--out assets/tiny_sft]
"""

import argparse
import functools
import json
import os
import random
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the shipped weights come from CPU arithmetic
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scripts import copy_rate as copy_rate_lib  # noqa: E402
from scripts import make_tiny_assets  # noqa: E402

SEED = 0
TOKENIZER = os.path.join(ROOT, "assets", "tiny_tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# The 2-layer, 64-wide Llama of the walking skeleton; ids match assets/tiny_tokenizer.
MODEL_CONFIG = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=256,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Measured copy rate on the tiny_prefs test prompts at a constant learning rate: 0% up to step
# ~1000, 23% at 1500, ~50% at 1750-2000. 1600 steps give 33%: a base that follows the instruction
# only partly. (A random init has nothing to copy with; 1750+ steps leave SimPO little to show.)
STEPS = 1600  # optimizer steps
BATCH = 32  # examples per step
LEARNING_RATE = 2e-3  # constant after warmup
WARMUP = 50  # steps
ADAM_BETA2 = 0.95  # as in Llama pretraining; learns the copy sooner than 0.999 (measured)
MAX_LENGTH = 48  # tokens per example; the longest SFT example is shorter (checked)

# No word here is in make_tiny_assets.WORDS (checked below).
SFT_WORDS = """
anchor arrow basket battle beard bell belt blanket board bone bottle bowl box brain branch brick
brush bucket bulb cabin cable camel canal canvas captain card carpet castle cave ceiling chain
chalk chest chicken chimney church cliff coat coin collar comb copper corner cotton cousin cow
crab crane crayon crown cup curtain cushion daisy deer dentist diamond dinner dragon drawer dream
drum duck eagle elbow elephant engineer envelope eye fabric face feather fence field finger flag
flute fog fork fox frog fruit funnel ghost giant gift giraffe goat goose grass guitar hammer hand
harbor harp heart helmet hook hose hotel insect jar jelly jewel judge kettle key kite knee knife
ladder lantern leaf leather lion lizard lock magnet map marble mask meadow melon metal monkey
needle nest net noodle nose nurse nut oak oven owl paint palace pan panda parrot peach pear
pillow pilot pipe pirate plate pocket pond pony puppy puzzle quilt radio rail robot rocket rope
rose ruler sail sailor scarf scissors seed sheep shelf shovel sink skirt sky sled slipper snail
snake sock sofa spider spoon stamp stick straw sweater swing sword tail tent thread throne toast
tooth torch towel tower toy tractor trumpet tulip tunnel turtle umbrella vase vest violin wagon
wallet whale wheel whistle wing wolf worm yarn zebra
blue purple pink brown gray black white calm brave clever gentle proud quiet rapid smooth soft
warm cold sharp round tall short young ancient busy empty heavy narrow wide
""".split()
SFT_WORDS = sorted(set(SFT_WORDS))
assert not set(SFT_WORDS) & set(make_tiny_assets.WORDS), set(SFT_WORDS) & set(make_tiny_assets.WORDS)
NUM_PSEUDO_WORDS = 12000  # made-up words: too many to memorise, so the model must learn to copy

# Instructions are built from these parts (thousands of phrasings, as a real SFT set has many).
# None uses a verb of the preference set's phrasings (repeat, say, echo; checked below).
VERBS = ["copy", "write", "type", "return", "output", "print", "reply with", "answer with",
         "respond with", "give me", "send me", "show me", "write down", "type out", "copy out",
         "hand me", "produce", "reproduce", "spell out", "read out"]
OBJECTS = ["the word", "this word", "just the word", "the following word", "one word",
           "the word below", "my word", "only the word", "this one word", "the next word"]
FRAMES = ["{Verb} {object}: {word}", "{Verb} {object} {word}.", "{Verb}: {word}",
          "{Verb} {object} {word}", "{Verb} {object} {word} again.", "Please {verb} {object}: {word}",
          "Could you {verb} {object} {word}?", "Now {verb} {object}: {word}",
          "{Verb} {object}, nothing else: {word}", "Kindly {verb} {object} {word}."]
assert not {"repeat", "say", "echo", "after"} & set(
    " ".join(VERBS + OBJECTS + FRAMES).lower().replace(":", " ").replace(",", " ").split())


def instruction(rng: random.Random, word: str) -> str:
    verb = rng.choice(VERBS)
    return rng.choice(FRAMES).format(verb=verb, Verb=verb[0].upper() + verb[1:],
                                     object=rng.choice(OBJECTS), word=word)


def pseudo_words(rng: random.Random, tokenizer, n: int) -> list[str]:
    """n distinct made-up words of 2-3 of the tokenizer's letter pieces, none a tiny_prefs word.

    A real SFT set covers its tokenizer's vocabulary; made-up words from its pieces do the same
    here without using a word of the preference set, and are too many to memorise.
    """
    pieces = sorted(t for t in tokenizer.get_vocab() if t.isascii() and t.isalpha() and t.islower())
    taken = set(make_tiny_assets.WORDS) | set(SFT_WORDS)
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(pieces) for _ in range(rng.randint(2, 3)))
        if word not in taken and len(word) <= 12:
            taken.add(word)
            words.append(word)
    return words


def sft_rows(tokenizer) -> list[tuple[str, str]]:
    """Every (prompt, response) of the SFT set, seeded: each word once, with a random phrasing."""
    rng = random.Random(SEED)
    words = SFT_WORDS + pseudo_words(rng, tokenizer, NUM_PSEUDO_WORDS)
    rows = [(instruction(rng, w), w) for w in words]
    rng.shuffle(rows)
    return rows


def encode(tokenizer, prompt: str, response: str) -> tuple[list, list]:
    """(token ids, loss mask): the chat-templated conversation, the mask on response tokens + EOS."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    head_ids = tokenizer.encode(head, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return head_ids + response_ids, [0] * len(head_ids) + [1] * len(response_ids)


def batches(tokenizer, rows, steps: int):
    """[BATCH, MAX_LENGTH] ids, attention mask and loss mask per step; epochs in a seeded order."""
    import numpy as np

    encoded = [encode(tokenizer, p, r) for p, r in rows]
    assert max(len(ids) for ids, _ in encoded) <= MAX_LENGTH
    rng = np.random.default_rng(SEED)
    order: list = []
    for _ in range(steps):
        if len(order) < BATCH:
            order += list(rng.permutation(len(encoded)))
        pick, order = order[:BATCH], order[BATCH:]
        ids = np.zeros((BATCH, MAX_LENGTH), np.int32)
        mask = np.zeros((BATCH, MAX_LENGTH), np.int32)
        loss_mask = np.zeros((BATCH, MAX_LENGTH), np.float32)
        for row, i in enumerate(pick):
            x, m = encoded[i]
            ids[row, :len(x)], mask[row, :len(x)], loss_mask[row, :len(x)] = x, 1, m
        yield ids, mask, loss_mask


def train(tokenizer, steps: int, on_step=None):
    """The SFT'd model (an NNX CausalLM) after `steps` AdamW steps; on_step(step, model, loss)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from simpo_jax import models

    config = dict(MODEL_CONFIG, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    graphdef, params = nnx.split(models.from_config(config, seed=SEED), nnx.Param)
    schedule = optax.warmup_constant_schedule(0.0, LEARNING_RATE, WARMUP)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=ADAM_BETA2, weight_decay=0.0))
    opt_state = optimizer.init(params)

    def loss_fn(params, ids, mask, loss_mask):
        logits = nnx.merge(graphdef, params)(ids[:, :-1], mask[:, :-1]).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
        weights = loss_mask[:, 1:]
        return (nll * weights).sum() / weights.sum()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids, mask, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask, loss_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i, batch in enumerate(batches(tokenizer, sft_rows(tokenizer), steps), 1):
        params, opt_state, loss = step(params, opt_state, *batch)
        if i % 100 == 0 or i == steps:
            print(f"step {i}/{steps}: response NLL {float(loss):.3f}", flush=True)
        if on_step is not None:
            on_step(i, nnx.merge(graphdef, params), loss)
    return nnx.merge(graphdef, params)


def heldout_prompts() -> list[str]:
    """The prompts of the tiny_prefs test split (the eval of configs/tiny.py)."""
    with open(os.path.join(ROOT, "assets", "tiny_prefs", "test_prefs.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f]


def main(out: str, steps: int) -> None:
    from transformers import AutoTokenizer

    from simpo_jax import models

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = train(tokenizer, steps)
    rate = copy_rate_lib.model_copy_rate(model, tokenizer, heldout_prompts())
    own = [p for p, _ in sft_rows(tokenizer)[:300]]
    seen = copy_rate_lib.model_copy_rate(model, tokenizer, own)
    models.save_pretrained(model, out, dtype="float32")
    for name in TOKENIZER_FILES:  # the shipped tokenizer, byte for byte
        shutil.copyfile(os.path.join(TOKENIZER, name), os.path.join(out, name))
    print(f"wrote {out}: copy rate of greedy samples {seen:.0%} on 300 of its SFT prompts, "
          f"{rate:.0%} on the tiny_prefs test prompts")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "assets", "tiny_sft"),
                        help="folder that receives the Hugging Face model")
    parser.add_argument("--steps", type=int, default=STEPS, help="SFT optimizer steps")
    args = parser.parse_args()
    main(args.out, args.steps)
