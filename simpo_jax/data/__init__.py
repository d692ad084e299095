"""Preference data: load rows, normalise formats, tokenise with the chat template, report, batch.

Public: DataConfig, check_paths, load_tokenizer, build_datasets, write_report, train_batches,
eval_batches, steps_per_epoch, padding_efficiency. Batch format: see batching.py. Mistakes in the
data or its settings raise errors.UserError, naming the entry, file, row or field and the fix.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np

from simpo_jax.errors import UserError
from simpo_jax.data import formats
from simpo_jax.data.batching import (default_buckets, eval_batches, padding_efficiency,
                                     steps_per_epoch, train_batches)
from simpo_jax.data.tokenize import TokenizeSettings, tokenize_pair
from simpo_jax import paths

__all__ = ["DataConfig", "TokenizedPairs", "PreferenceData", "check_paths", "load_tokenizer",
           "build_datasets", "write_report", "format_report", "train_batches", "eval_batches",
           "steps_per_epoch", "padding_efficiency", "default_buckets"]

CACHE_VERSION = "simpo_jax-data-1"  # bump when tokenisation changes, to invalidate caches
REPORT_BATCH_SIZE = 16  # pairs per batch for the report's padding efficiency
EXAMPLES_PER_REASON = 5
TRUNCATION_WARNING_FRACTION = 0.05  # the console table warns above this fraction of truncated pairs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset_mixer: tuple  # ((name_or_path, fraction <= 1 or row count > 1), ...)
    dataset_splits: tuple = ("train_prefs", "test_prefs")
    data_format: str = "auto"  # auto | ultrafeedback | messages | distilabel_math | plain
    assistant_header_in: str = "prompt"  # prompt (TRL) | completion (original SimPO scripts)
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation_mode: str = "keep_end"
    max_dropped_fraction: float = 0.05
    preprocessing_num_workers: int = 1
    seed: int = 42
    tokenizer_name_or_path: str = ""
    chat_template: str = ""  # "" = the tokenizer's; "alignment_handbook"; Jinja text or a .jinja file
    dataset_cache_dir: str = ""  # "" = datasets' default cache
    length_buckets: tuple = ()  # padded batch lengths; () = powers of 2 from 64, max_length

    @classmethod
    def from_config(cls, config) -> "DataConfig":
        mixer = config.dataset_mixer
        mixer = mixer.to_dict() if hasattr(mixer, "to_dict") else dict(mixer)
        return cls(dataset_mixer=tuple(mixer.items()),
                   dataset_splits=tuple(config.dataset_splits),
                   data_format=config.data_format,
                   assistant_header_in=config.assistant_header_in,
                   max_length=config.max_length,
                   max_prompt_length=config.max_prompt_length,
                   truncation_mode=config.truncation_mode,
                   max_dropped_fraction=config.max_dropped_fraction,
                   preprocessing_num_workers=config.preprocessing_num_workers,
                   seed=config.seed,
                   tokenizer_name_or_path=config.tokenizer_name_or_path,
                   chat_template=config.chat_template,
                   dataset_cache_dir=config.dataset_cache_dir,
                   length_buckets=tuple(config.length_buckets))

    def validate(self) -> None:
        checks = [
            ("data_format", self.data_format in formats.FORMATS, ", ".join(formats.FORMATS)),
            ("assistant_header_in", self.assistant_header_in in ("prompt", "completion"),
             "prompt, completion"),
            ("truncation_mode", self.truncation_mode in ("keep_end", "keep_start"),
             "keep_end, keep_start"),
            ("max_prompt_length", 0 < self.max_prompt_length, "a positive number of tokens"),
            ("max_length", self.max_length > 1, "more than 1 token"),
            ("dataset_mixer", bool(self.dataset_mixer), "at least one dataset"),
            ("dataset_splits", any("train" in s for s in self.dataset_splits),
             "a list with a split name containing 'train'"),
        ]
        for field, ok, valid in checks:
            if not ok:
                raise UserError(f"{field}={getattr(self, field)!r} is invalid; valid: {valid}.")
        for name, amount in self.dataset_mixer:
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0 or (
                    amount > 1 and amount != int(amount)):
                raise UserError(f"dataset_mixer[{name!r}]={amount!r}; valid: a fraction in (0, 1] "
                                "or a whole row count > 1.")

    @property
    def splits(self) -> tuple:
        """(train split, eval split or None)."""
        train = next(s for s in self.dataset_splits if "train" in s)
        test = next((s for s in self.dataset_splits if "test" in s), None)
        return train, test


@dataclasses.dataclass
class TokenizedPairs:
    prompt_ids: list  # per pair: int32 arrays
    chosen_ids: list  # completion tokens only
    rejected_ids: list
    sources: list  # per pair: "name_or_path:split:row"

    @property
    def num_pairs(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> np.ndarray:
        """Per pair: the longer of prompt + chosen and prompt + rejected."""
        return np.array([len(p) + max(len(c), len(r)) for p, c, r in
                         zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], np.int64)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            h.update(np.array([len(x) for x in part], np.int64).tobytes())
            h.update(np.concatenate(part).astype(np.int32).tobytes() if part else b"")
        return h.hexdigest()[:16]


@dataclasses.dataclass
class PreferenceData:
    train: TokenizedPairs
    eval: TokenizedPairs
    report: dict
    pad_id: int
    fingerprint: str


def check_paths(dataset_mixer) -> None:
    """Raises UserError for a dataset_mixer entry naming a local path that does not exist.

    Reads nothing and asks no server, so a run can call it before anything is loaded.
    """
    for name in dataset_mixer:
        if paths.looks_local(name) and paths.resolve_local(name) is None:
            raise formats.missing_path(name)


def load_tokenizer(data_config: DataConfig):
    """The tokenizer from a local folder (resolved like dataset paths); never runs remote code."""
    from transformers import AutoTokenizer
    path = paths.resolve_local(data_config.tokenizer_name_or_path) or \
        data_config.tokenizer_name_or_path
    if not path:
        raise UserError("tokenizer_name_or_path and model_name_or_path are both empty; set one "
                        "to a local Hugging Face tokenizer folder.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise UserError(f"tokenizer_name_or_path={data_config.tokenizer_name_or_path!r}: no "
                        f"tokenizer loads from {path} ({type(e).__name__}: {first}). Give a folder "
                        "holding tokenizer.json (or tokenizer.model) and tokenizer_config.json."
                        ) from e
    if data_config.chat_template:
        tokenizer.chat_template = chat_template_text(data_config.chat_template)
    return tokenizer


# alignment-handbook's DEFAULT_CHAT_TEMPLATE (src/alignment/data.py), used by the original SimPO
# scripts when a tokenizer has none.
ALIGNMENT_HANDBOOK_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' "
    "+ message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
    "'<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
    "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def chat_template_text(value: str) -> str:
    """config.chat_template -> Jinja text: a named template, a .jinja file, or the text itself."""
    if value == "alignment_handbook":
        return ALIGNMENT_HANDBOOK_TEMPLATE
    if value.endswith(".jinja"):
        path = paths.resolve_local(value)
        if path is None:
            raise UserError(f"chat_template={value!r}: no such file; give a .jinja file, "
                            "Jinja text, or 'alignment_handbook'.")
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise UserError(f"chat_template={value!r} is neither Jinja text, a .jinja file nor "
                        "'alignment_handbook'.")
    return value


def build_datasets(data_config: DataConfig, tokenizer) -> PreferenceData:
    """Rows of every mixer entry -> tokenised train and eval pairs, a data report and a fingerprint."""
    data_config.validate()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"The tokenizer ({data_config.tokenizer_name_or_path}) has no eos_token: "
                        "every completion must end with one; set eos_token in its "
                        "tokenizer_config.json.")
    train_split, eval_split = data_config.splits
    settings = TokenizeSettings(data_config.max_length, data_config.max_prompt_length,
                                data_config.truncation_mode, data_config.assistant_header_in)
    report = {"settings": dict(max_length=settings.max_length,
                               max_prompt_length=settings.max_prompt_length,
                               truncation_mode=settings.truncation_mode,
                               assistant_header_in=settings.assistant_header_in),
              "splits": {}}
    result = {}
    for role, split in (("train", train_split), ("eval", eval_split)):
        records, split_report = _read_split(data_config, split, role)
        pairs = _tokenize(records, split_report, tokenizer, settings, data_config)
        split_report.update(_length_stats(pairs))
        result[role] = pairs
        report["splits"][role] = split_report
    _check_dropped(report, data_config.max_dropped_fraction)
    if not result["train"].num_pairs:
        train = report["splits"]["train"]
        why = (f"all {train['rows_read']} rows were dropped ({_reasons(train)})"
               if train["rows_read"] else "it has no rows")
        raise UserError(f"No training pairs in split {train_split!r} of dataset_mixer "
                        f"{dict(data_config.dataset_mixer)}: {why}. Fix the data or choose "
                        "data_format.")
    report["padding_efficiency"] = _padding_report(result, pad_id, data_config)
    fingerprint = result["train"].fingerprint()
    report["fingerprint"] = fingerprint
    return PreferenceData(result["train"], result["eval"], report, pad_id, fingerprint)


def _read_split(data_config: DataConfig, split, role: str):
    """Normalised records of one split over the mixer, and its report (rows read, drops)."""
    report = dict(split=split, rows_read=0, rows_kept=0, dropped={}, dropped_examples={},
                  formats={})
    records = []
    if split is None:
        return records, report
    for name, amount in data_config.dataset_mixer:
        rows = formats.load_split(name, split, role="train" if role == "train" else "test",
                                  cache_dir=data_config.dataset_cache_dir)
        if rows is None and role == "train":
            raise _no_train_split(name, split)
        if rows is None:
            continue
        if role == "train":  # the mixer's fraction/count applies to training rows only
            n = int(amount * len(rows)) if amount <= 1 else min(int(amount), len(rows))
            rows = rows.select(range(n)) if hasattr(rows, "select") else rows[:n]
        fmt = formats.detect_format(rows, data_config.data_format)
        report["formats"][name] = fmt
        for i, row in enumerate(rows):
            report["rows_read"] += 1
            label = f"{name}:{split}:{i}"
            try:
                rec = formats.normalise(row, fmt)
            except formats.BadRow as bad:
                _drop(report, bad.reason, label)
                continue
            if rec["chat"]:
                rec["prompt"] = json.dumps(rec["prompt"], ensure_ascii=False)
            rec["source"] = label
            records.append(rec)
    return records, report


def _no_train_split(name: str, split: str) -> UserError:
    local = paths.resolve_local(name)
    where = (f"{local} has no {split!r} or 'train' split (a {split}.* or train.* file, * = "
             f"{'/'.join(e[1:] for e in formats.FILE_EXTENSIONS)}, or a split of a saved data set)"
             if local else f"the data set has no split {split!r}")
    return UserError(f"dataset_mixer entry {name!r}: {where}. The training split is the first "
                     "name containing 'train' in config.dataset_splits; every entry needs it.")


def _drop(report: dict, reason: str, label: str) -> None:
    report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
    examples = report["dropped_examples"].setdefault(reason, [])
    if len(examples) < EXAMPLES_PER_REASON:
        examples.append(label)


def _tokenize(records: list, report: dict, tokenizer, settings, data_config) -> TokenizedPairs:
    """Tokenised pairs via datasets.map, cached on disk by content, tokenizer and settings."""
    empty = TokenizedPairs([], [], [], [])
    if not records:
        return empty
    if any(r["chat"] for r in records) and not tokenizer.chat_template:
        raise UserError("The data holds chat messages but the tokenizer has no chat template (a "
                        "base model's usually has none): set config.chat_template (e.g. "
                        "'alignment_handbook', as the original SimPO scripts do, or a .jinja file), "
                        "or give pre-formatted text with data_format='plain'.")
    import datasets
    key = _cache_key(records, tokenizer, settings)
    cache_dir = os.path.join(data_config.dataset_cache_dir or datasets.config.HF_DATASETS_CACHE,
                             "simpo_jax_tokenized")
    os.makedirs(cache_dir, exist_ok=True)
    workers = data_config.preprocessing_num_workers
    ds = datasets.Dataset.from_list(records).map(
        tokenize_pair, fn_kwargs=dict(tokenizer=tokenizer, settings=settings),
        remove_columns=["chat", "prompt", "chosen", "rejected"],
        num_proc=workers if workers > 1 and len(records) >= 2 * workers else None,
        cache_file_name=os.path.join(cache_dir, f"{key}.arrow"), new_fingerprint=key,
        load_from_cache_file=True, desc="Tokenizing preference pairs")
    columns = ds.to_dict()
    pairs = TokenizedPairs([], [], [], [])
    for i, reason in enumerate(columns["drop_reason"]):
        if reason:
            _drop(report, reason, columns["source"][i])
            continue
        pairs.prompt_ids.append(np.asarray(columns["prompt_ids"][i], np.int32))
        pairs.chosen_ids.append(np.asarray(columns["chosen_ids"][i], np.int32))
        pairs.rejected_ids.append(np.asarray(columns["rejected_ids"][i], np.int32))
        pairs.sources.append(columns["source"][i])
    report["rows_kept"] = pairs.num_pairs
    for flag in ("prompt_truncated", "completion_truncated", "boundary_merge"):
        report[flag] = int(sum(columns[flag]))
    report["pairs_truncated"] = int(sum(p or c for p, c in zip(columns["prompt_truncated"],
                                                              columns["completion_truncated"])))
    report["truncated_fraction"] = round(report["pairs_truncated"] / len(records), 4)
    return pairs


def _cache_key(records: list, tokenizer, settings) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         type(tokenizer).__name__, dataclasses.asdict(settings)],
                        default=str).encode())
    for r in records:
        h.update(json.dumps(r, ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _length_stats(pairs: TokenizedPairs) -> dict:
    if not pairs.num_pairs:
        return {"token_lengths": {}}
    p = np.array([len(x) for x in pairs.prompt_ids])
    c = np.array([len(x) for x in pairs.chosen_ids])
    r = np.array([len(x) for x in pairs.rejected_ids])
    stats = {}
    for name, values in (("prompt", p), ("chosen", c), ("rejected", r),
                         ("total", p + np.maximum(c, r))):
        q = np.percentile(values, [50, 90, 99])
        stats[name] = dict(p50=float(q[0]), p90=float(q[1]), p99=float(q[2]), max=int(values.max()))
    return {"token_lengths": stats}


def _padding_report(result: dict, pad_id: int, data_config: DataConfig) -> dict:
    """Mean padding efficiency of one epoch of train batches and of the eval batches."""
    out = {"batch_size": REPORT_BATCH_SIZE}
    train, evaluation = result["train"], result["eval"]
    size = min(REPORT_BATCH_SIZE, train.num_pairs)
    batches = train_batches(train, batch_size=size, seed=data_config.seed, pad_id=pad_id,
                            max_length=data_config.max_length,
                            length_buckets=data_config.length_buckets)
    out["train"] = round(float(np.mean([padding_efficiency(next(batches)) for _ in
                                        range(steps_per_epoch(train, size))])), 4)
    if evaluation.num_pairs:
        out["eval"] = round(float(np.mean([padding_efficiency(b) for b in eval_batches(
            evaluation, batch_size=REPORT_BATCH_SIZE, pad_id=pad_id,
            max_length=data_config.max_length, length_buckets=data_config.length_buckets)])), 4)
    return out


def _check_dropped(report: dict, max_dropped_fraction: float) -> None:
    for role, s in report["splits"].items():
        dropped = sum(s["dropped"].values())
        s["dropped_fraction"] = dropped / s["rows_read"] if s["rows_read"] else 0.0
        if s["dropped_fraction"] > max_dropped_fraction:
            raise UserError(
                f"{s['dropped_fraction']:.1%} of the {s['rows_read']} rows of the {role} split "
                f"{s['split']!r} were dropped ({dropped}), more than max_dropped_fraction="
                f"{max_dropped_fraction}. Top reasons: {_reasons(s)}. Fix the data, choose "
                "data_format, or raise max_dropped_fraction.")


def _reasons(split_report: dict) -> str:
    """The three commonest drop reasons of a split, with counts and example rows."""
    top = sorted(split_report["dropped"].items(), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"{reason}: {n} (e.g. rows {', '.join(split_report['dropped_examples'][reason])})"
                     for reason, n in top)


def format_report(report: dict) -> str:
    """A short table: rows, truncations and drops per split, token length percentiles, padding
    efficiency; warnings when more than TRUNCATION_WARNING_FRACTION of a split's pairs are cut."""
    lines = [f"{'split':<6} {'read':>7} {'kept':>7}  {'truncated prompts':>17}  "
             f"{'truncated completions':>21}  dropped"]
    warnings = []
    for role, s in report["splits"].items():
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-"
        prompts, completions = s.get("prompt_truncated", 0), s.get("completion_truncated", 0)
        lines.append(f"{role:<6} {s['rows_read']:>7} {s['rows_kept']:>7}  {prompts:>17}  "
                     f"{completions:>21}  {drops}")
        if s.get("truncated_fraction", 0) > TRUNCATION_WARNING_FRACTION:
            settings = report["settings"]
            warnings.append(
                f"warning: {s['truncated_fraction']:.1%} of the {role} pairs are truncated "
                f"({prompts} prompts cut to max_prompt_length={settings['max_prompt_length']} "
                f"tokens, {completions} completions cut at max_length={settings['max_length']} "
                "tokens), so the model sees cut text; raise max_prompt_length and max_length, or "
                "filter the long rows out of the data.")
    lines.append(f"{'tokens':<15} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
    for role, s in report["splits"].items():
        for name, q in s["token_lengths"].items():
            lines.append(f"{role + ' ' + name:<15} {q['p50']:>6.0f} {q['p90']:>6.0f} "
                         f"{q['p99']:>6.0f} {q['max']:>6}")
    pad = report.get("padding_efficiency", {})
    lines.append("padding efficiency (batch of {}): ".format(pad.get("batch_size")) + ", ".join(
        f"{k} {v:.1%}" for k, v in pad.items() if k != "batch_size"))
    return "\n".join(lines + warnings)


def write_report(report: dict, output_dir: str) -> str:
    """Prints the table and writes output_dir/data_report.json; returns the file's path."""
    print(format_report(report), flush=True)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "data_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return path
