"""--mode=generate: sample answers to the data's prompts in resumable shards, score them, pair them.

    <generation_output_dir>/                      (default <output_dir>/onpolicy)
        generation_manifest.json   what was sampled (policy, seeds, sampling settings, prompts)
        shards/generations-NNNNN.jsonl   per prompt: the answers, in order of generation_seeds
        shards/scores-NNNNN.jsonl        per prompt: the reward model's score of each answer
        train.jsonl, test.jsonl    preference rows (pairs.py), readable as dataset_mixer={dir: 1.0}
        onpolicy_report.json       prompts in, drops per reason, scores, chosen/rejected lengths

A shard is written whole (temporary name, then renamed) once its prompts are done, and a rerun
skips the shards that exist. Each answer's PRNG key is PRNGKey(seed) folded with its prompt's id
and the step, so a resumed run draws the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time

import jax

from simpo_jax import build as build_lib
from simpo_jax.data import formats, rows as data_rows, tokenize
from simpo_jax.hub import download
from simpo_jax import setup
from simpo_jax import sharding as sharding_lib
from simpo_jax.errors import UserError
from simpo_jax.paths import RunDir
from simpo_jax.onpolicy import pairs as pairs_lib
from simpo_jax.onpolicy import reward, sampling

log = logging.getLogger(__name__)

MANIFEST = "generation_manifest.json"
SCORES_MANIFEST = "scores_manifest.json"
REPORT = "onpolicy_report.json"
PROGRESS_SECONDS = 10.0  # between progress lines within a shard


def output_dir(config) -> str:
    return config.generation_output_dir or os.path.join(config.output_dir, "onpolicy")


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# --- The policy ------------------------------------------------------------------------------

def stop_token_ids(tokenizer, model_path: str) -> tuple[int, ...]:
    """The tokenizer's EOS and generation_config.json's eos_token_id (one id or a list), as
    transformers' and vLLM's generate stop: instruction-tuned models often end a turn with another
    token than the tokenizer's EOS (Gemma-2-it: <end_of_turn>; Llama-3-Instruct: <|eot_id|>)."""
    ids = {tokenizer.eos_token_id} - {None}
    path = os.path.join(model_path, "generation_config.json") if model_path else ""
    if path and os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids |= set([eos] if isinstance(eos, int) else eos or [])
    if not ids:
        raise UserError("The policy's tokenizer has no eos_token and its generation_config.json "
                        "no eos_token_id, so answers would never stop; set eos_token in its "
                        "tokenizer_config.json.")
    return tuple(sorted(ids))


def _checkpoint_steps(config) -> list[int]:
    from simpo_jax import checkpoint as ckpt_lib

    return ckpt_lib.saved_steps(RunDir(config.output_dir).checkpoints)


def policy_source(config, *, checkpoint: bool = True) -> str:
    """What load_policy will load, named without loading it (the generation manifest's policy)."""
    if checkpoint and config.resume_from:
        return f"checkpoint {config.resume_from}"
    steps = _checkpoint_steps(config) if checkpoint else []
    if steps:
        return f"checkpoint {os.path.join(config.output_dir, 'checkpoints')}/{steps[-1]}"
    return config.model_name_or_path or f"model_init (seed {config.model_init_seed})"


def load_policy(config, *, checkpoint: bool = True):
    """(model, tokenizer, mesh, source, stop ids): the run's latest checkpoint (or
    config.resume_from) when there is one and `checkpoint`, else model_name_or_path (or
    model_init)."""
    if checkpoint and (_checkpoint_steps(config) or config.resume_from):
        run = build_lib.build(config, with_data=False)
        run.checkpointer.close()
        model = run.model()  # with a LoRA run's frozen base
        source = (f"checkpoint {config.resume_from}" if config.resume_from else  # the step
                  f"checkpoint {run.checkpointer.directory}/{run.start_step}")  # restored
        stops = stop_token_ids(run.tokenizer, setup.pretrained_paths(config)[0])
        return model, run.tokenizer, run.mesh, source, stops
    mesh = setup.start(config)
    tokenizer, model_path, _ = setup.load_tokenizer(config)
    hf_config = setup.model_config(config, tokenizer, model_path)
    # The base model as it was before training: no adapters.
    model = setup.load_model(config, hf_config, mesh, model_path, weights=True, lora=False)
    stops = stop_token_ids(tokenizer, model_path)
    return model.module(), tokenizer, mesh, policy_source(config, checkpoint=False), stops


def sample_answers(config, model, tokenizer, mesh, stops, prompt_ids: list, seeds: list,
                   salts: list, progress: str = "") -> list[list[int]]:
    """New tokens of each row (prompt tokens, seed, salt), batched by prompt length."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    dp = sharding_lib.data_parallel_size(mesh)
    rows = config.generation_per_device_batch_size * dp
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    out: list = [None] * len(prompt_ids)
    keys = sampling.row_keys(seeds, salts)
    tokens, start = 0, time.time()
    said = start
    for b in range(0, len(order), rows):
        chunk = order[b:b + rows]
        batch = [prompt_ids[i] for i in chunk]
        new = sampling.sample(
            model, batch, keys[chunk], max_new_tokens=config.generation_max_new_tokens,
            eos_token_id=stops, pad_token_id=pad,
            temperature=config.generation_temperature, top_p=config.generation_top_p, mesh=mesh,
            prompt_length=reward.bucket(max(len(p) for p in batch)), batch_rows=rows)
        for i, t in zip(chunk, new):
            out[i] = t
        tokens += sum(len(t) for t in new)
        now = time.time()
        if now - said >= PROGRESS_SECONDS or b + rows >= len(order):
            said = now
            _say(f"generate{progress}: {min(b + rows, len(order))}/{len(order)} answers, "
                 f"{tokens} tokens, {tokens / max(now - start, 1e-9):.1f} tokens/s (compiles "
                 "included)")
    return out


# --- Sampling in shards ----------------------------------------------------------------------

def _manifest(config, source: str, prompts: list) -> dict:
    return {"policy": source, "num_prompts": len(prompts),
            "prompts": formats.prompt_id([p["prompt_id"] for p in prompts]),
            "generation_num_samples": config.generation_num_samples,
            "generation_seeds": [int(s) for s in config.generation_seeds],
            "generation_temperature": float(config.generation_temperature),
            "generation_top_p": float(config.generation_top_p),
            "generation_max_new_tokens": config.generation_max_new_tokens,
            "generation_shard_prompts": config.generation_shard_prompts,
            "max_prompt_length": config.max_prompt_length,
            "truncation_mode": config.truncation_mode}


def _check_manifest(path: str, wanted: dict, what: str, fix: str) -> None:
    """Writes the manifest, or refuses to mix shards made with other settings."""
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"{os.path.dirname(path)} holds {what} made with {k}={found.get(k)!r}, "
                            f"not {wanted.get(k)!r} (differing: {', '.join(diff)}). {fix}")
        return
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(wanted, f, indent=2)
        os.replace(path + ".tmp", path)


def shard_path(out_dir: str, kind: str, index: int) -> str:
    return os.path.join(out_dir, "shards", f"{kind}-{index:05d}.jsonl")


def sample_shards(config, model, tokenizer, mesh, stops, prompts: list, source: str) -> str:
    """Samples generation_num_samples answers per prompt into shards; skips shards already there."""
    out_dir = output_dir(config)
    _check_manifest(os.path.join(out_dir, MANIFEST), _manifest(config, source, prompts),
                    "generations", "Use another config.generation_output_dir, or delete that "
                    "folder to sample again.")
    if jax.process_index() == 0:
        os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
        for stale in glob.glob(os.path.join(out_dir, "**", "*.tmp"), recursive=True):
            os.remove(stale)  # a write cut short by the interruption; its shard is redone
    tokenized = []
    for p in prompts:
        ids, truncated = tokenize.prompt_token_ids(tokenizer, p["messages"],
                                                   config.max_prompt_length, config.truncation_mode)
        tokenized.append((p, ids, truncated))
    tokenized.sort(key=lambda x: (len(x[1]), x[0]["prompt_id"]))  # grouped by length
    size = config.generation_shard_prompts
    shards = [tokenized[i:i + size] for i in range(0, len(tokenized), size)]
    todo = [k for k in range(len(shards)) if not os.path.exists(shard_path(out_dir, "generations", k))]
    _say(f"generate: {len(prompts)} prompts x {config.generation_num_samples} answers from "
         f"{source}, {len(shards)} shards ({len(shards) - len(todo)} already done) in {out_dir}")
    n = config.generation_num_samples
    for k in todo:
        shard = shards[k]
        rows = [(i, j) for i in range(len(shard)) for j in range(n)]
        new = sample_answers(
            config, model, tokenizer, mesh, stops, [shard[i][1] for i, _ in rows],
            [config.generation_seeds[j] for _, j in rows],
            [int(shard[i][0]["prompt_id"][:8], 16) for i, _ in rows],
            progress=f" shard {k + 1}/{len(shards)}")
        records = []
        for i, (p, ids, truncated) in enumerate(shard):
            answers = new[i * n:(i + 1) * n]
            records.append({
                "prompt_id": p["prompt_id"], "prompt": p["prompt"], "messages": p["messages"],
                "responses": [tokenizer.decode(t, skip_special_tokens=True) for t in answers],
                "response_tokens": [len(t) for t in answers],
                "finished": [bool(t) and t[-1] in stops for t in answers],
                "prompt_truncated": truncated})
        if jax.process_index() == 0:
            pairs_lib.write_jsonl(shard_path(out_dir, "generations", k), records)
    return out_dir


def read_shards(out_dir: str, kind: str) -> list[list[dict]]:
    paths = sorted(glob.glob(os.path.join(out_dir, "shards", f"{kind}-*.jsonl")))
    return [data_rows.read_file(p) for p in paths]


# --- Scoring and pairs -----------------------------------------------------------------------

def load_reward_model(config, mesh):
    """(reward model, its tokenizer) of config.reward_model_name_or_path."""
    where = f"config.reward_model_name_or_path={config.reward_model_name_or_path!r}"
    path = download.resolve_pretrained(config.reward_model_name_or_path,
                                  field="reward_model_name_or_path")
    model = reward.from_pretrained(path, mesh=mesh, dtype=setup.ModelSpec.from_config(config).dtype,
                                   where=where)
    return model, reward.load_tokenizer(path, where)


def score_answers(config, model, tokenizer, mesh, items: list[tuple[list, str]]) -> list[float]:
    """Scores of (prompt messages, answer) items; each distinct item is scored once, so the same
    answer to the same prompt always gets the same score."""
    keys = [json.dumps([m, a], ensure_ascii=False) for m, a in items]
    unique = list(dict.fromkeys(keys))
    first = {k: items[keys.index(k)] for k in unique}
    ids = [reward.conversation_ids(tokenizer, *first[k]) for k in unique]
    dp = sharding_lib.data_parallel_size(mesh)
    scores = reward.score_ids(model, ids, batch_size=config.reward_per_device_batch_size * dp,
                              mesh=mesh)
    by_key = dict(zip(unique, scores.tolist()))
    return [by_key[k] for k in keys]


def score_shards(config, mesh) -> None:
    """Scores every generated shard that has no scores shard yet."""
    out_dir = output_dir(config)
    _check_manifest(os.path.join(out_dir, SCORES_MANIFEST),
                    {"reward_model": config.reward_model_name_or_path, "bf16": bool(config.bf16)},
                    "scores", f"To score the same answers again, delete {SCORES_MANIFEST} and "
                    "shards/scores-*.jsonl there.")
    generated = read_shards(out_dir, "generations")
    todo = [k for k in range(len(generated)) if not os.path.exists(shard_path(out_dir, "scores", k))]
    if not todo:
        return
    model, tokenizer = load_reward_model(config, mesh)
    for k in todo:
        start = time.time()
        items = [(r["messages"], a) for r in generated[k] for a in r["responses"]]
        scores = score_answers(config, model, tokenizer, mesh, items)
        n = config.generation_num_samples
        rows = [{"prompt_id": r["prompt_id"], "scores": scores[i * n:(i + 1) * n]}
                for i, r in enumerate(generated[k])]
        if jax.process_index() == 0:
            pairs_lib.write_jsonl(shard_path(out_dir, "scores", k), rows)
        _say(f"score: shard {k + 1}/{len(generated)}, {len(items)} answers in "
             f"{time.time() - start:.1f}s")


def write_pairs(config, tokenizer) -> dict:
    """train.jsonl, test.jsonl and the report from the scored shards."""
    out_dir = output_dir(config)
    records = []
    for gen, scores in zip(read_shards(out_dir, "generations"), read_shards(out_dir, "scores")):
        for g, s in zip(gen, scores):
            assert g["prompt_id"] == s["prompt_id"], (g["prompt_id"], s["prompt_id"])
            records.append({**g, "scores": s["scores"]})
    rows, dropped = pairs_lib.make_rows(records)
    train, test = pairs_lib.split(rows, config.generation_test_fraction, config.seed)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    rep = pairs_lib.report(records, rows, dropped, train, test, count)
    rep["unfinished_answers"] = sum(not f for r in records for f in r["finished"])
    rep["truncated_prompts"] = sum(bool(r["prompt_truncated"]) for r in records)
    if jax.process_index() == 0:
        pairs_lib.write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
        pairs_lib.write_jsonl(os.path.join(out_dir, "test.jsonl"), test)
        with open(os.path.join(out_dir, REPORT), "w") as f:
            json.dump(rep, f, indent=2)
    _say(pairs_lib.format_report(rep) + f"\nwritten: {out_dir}/train.jsonl, test.jsonl, {REPORT}; "
         f"train on them with --config.dataset_mixer='{{\"{out_dir}\": 1.0}}'")
    return rep


def check_reward_model(config) -> None:
    """Refuses an unusable reward model from its config and tokenizer alone, before any sampling."""
    where = f"config.reward_model_name_or_path={config.reward_model_name_or_path!r}"
    path = download.resolve_pretrained(config.reward_model_name_or_path, weights=False,
                                  field="reward_model_name_or_path")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{where}: no config.json in {path}; give a transformers "
                        "*ForSequenceClassification folder or Hub id.")
    with open(config_path) as f:
        reward.check_config(json.load(f), where)
    reward.load_tokenizer(path, where)


def sampled_already(config, prompts: list) -> bool:
    """Whether every generation shard of these prompts exists, made with these settings."""
    out_dir = output_dir(config)
    manifest = os.path.join(out_dir, MANIFEST)
    shards = -(-len(prompts) // config.generation_shard_prompts)
    if not os.path.exists(manifest) or not all(
            os.path.exists(shard_path(out_dir, "generations", k)) for k in range(shards)):
        return False
    _check_manifest(manifest, _manifest(config, policy_source(config), prompts), "generations",
                    "Use another config.generation_output_dir, or delete that folder to sample "
                    "again.")
    return True


def generate(config) -> dict:
    """--mode=generate: sample (resumable), then score and pair when a reward model is set."""
    if config.reward_model_name_or_path:
        check_reward_model(config)
    prompts = data_rows.load_prompts(config, "train")
    if not prompts:
        raise UserError(f"No prompts in the training split of dataset_mixer "
                        f"{dict(config.dataset_mixer)}: rows need a prompt, instruction, or "
                        "chosen/messages turns.")
    out_dir = output_dir(config)
    if sampled_already(config, prompts):  # e.g. rerun with a reward model: no policy to load
        _say(f"generate: every shard of {len(prompts)} prompts is in {out_dir} already")
        mesh = setup.start(config)
        tokenizer, _, _ = setup.load_tokenizer(config)
    else:
        model, tokenizer, mesh, source, stops = load_policy(config)
        start = time.time()
        sample_shards(config, model, tokenizer, mesh, stops, prompts, source)
        _say(f"generate: done in {time.time() - start:.1f}s")
        del model
    if not config.reward_model_name_or_path:
        _say(f"Answers in {out_dir}/shards; set config.reward_model_name_or_path and rerun to "
             "score them and write preference pairs.")
        return {"output_dir": out_dir}
    score_shards(config, mesh)
    return write_pairs(config, tokenizer)
