"""Tokenised preference pairs of a run's data: rows read over the mixer, tokenised with the chat
template (cached on disk by content), reported; the settings come from the run config.

Mistakes in the data raise errors.UserError, naming the entry, file, row or field and the fix.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np

from simpo_jax.data import padded, report as report_lib, rows
from simpo_jax.data.tokenize import TemplateRefused, TokenizeSettings, template_error, tokenize_pair
from simpo_jax.errors import UserError

# Bump when tokenisation or its drop rules change, so a cache of the old rules is never reused.
CACHE_VERSION = "simpo_jax-data-2"  # 2: pairs identical after truncation are dropped
REPORT_BATCH_SIZE = 16  # pairs per batch for the report's padding efficiency


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The run config's data fields (defaults and checks: the config schema's)."""

    dataset_mixer: tuple  # ((name_or_path, fraction <= 1 or row count > 1), ...)
    dataset_splits: tuple
    data_format: str
    assistant_header_in: str
    max_length: int
    max_prompt_length: int
    truncation_mode: str
    max_dropped_fraction: float
    preprocessing_num_workers: int
    seed: int
    tokenizer_name_or_path: str
    chat_template: str
    dataset_cache_dir: str
    length_buckets: tuple

    @classmethod
    def from_config(cls, config) -> "DataConfig":
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**fields, "dataset_mixer": rows.mixer_items(config.dataset_mixer),
                      "dataset_splits": tuple(config.dataset_splits),
                      "length_buckets": tuple(config.length_buckets)})

    def validate(self) -> None:
        """The one check the run config does not make: a training split is named."""
        if not any("train" in s for s in self.dataset_splits):
            raise UserError(f"dataset_splits={self.dataset_splits!r} is invalid; valid: a list "
                            "with a split name containing 'train'.")

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
    result, digests = {}, {}
    for role, split in (("train", train_split), ("eval", eval_split)):
        records, split_report = rows.read_split(data_config, split, role)
        digests[role] = report_lib.row_digests(records)
        pairs = _tokenize(records, split_report, tokenizer, settings, data_config)
        split_report.update(report_lib.length_stats(pairs))
        result[role] = pairs
        report["splits"][role] = split_report
    report_lib.count_repeats(report, digests)
    report_lib.check_dropped(report, data_config.max_dropped_fraction)
    if not result["train"].num_pairs:
        raise _no_train_pairs(report, train_split, data_config)
    report["padding_efficiency"] = _padding_report(result, pad_id, data_config)
    fingerprint = result["train"].fingerprint()
    report["fingerprint"] = fingerprint
    return PreferenceData(result["train"], result["eval"], report, pad_id, fingerprint)


def _no_train_pairs(report: dict, train_split: str, data_config: DataConfig) -> UserError:
    train = report["splits"]["train"]
    why = (f"all {train['rows_read']} rows were dropped ({report_lib.reasons(train)})"
           if train["rows_read"] else "it has no rows")
    fix = ("Fix the data or choose data_format" if not train["dropped_by_length_budget"] else
           report_lib.budget_advice(report["settings"]).capitalize())
    return UserError(f"No training pairs in split {train_split!r} of dataset_mixer "
                     f"{dict(data_config.dataset_mixer)}: {why}. {fix}.")


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
    try:
        ds = datasets.Dataset.from_list(records).map(
            tokenize_pair, fn_kwargs=dict(tokenizer=tokenizer, settings=settings),
            remove_columns=["chat", "prompt", "chosen", "rejected"],
            num_proc=workers if workers > 1 and len(records) >= 2 * workers else None,
            cache_file_name=os.path.join(cache_dir, f"{key}.arrow"), new_fingerprint=key,
            load_from_cache_file=True, desc="Tokenizing preference pairs")
    except TemplateRefused as err:
        raise template_error(err, data_config.chat_template, tokenizer) from None
    columns = ds.to_dict()
    pairs = TokenizedPairs([], [], [], [])
    for i, reason in enumerate(columns["drop_reason"]):
        if reason:
            report_lib.drop(report, reason, columns["source"][i])
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


def _padding_report(result: dict, pad_id: int, data_config: DataConfig) -> dict:
    """Mean padding efficiency of one epoch of train batches and of the eval batches."""
    out = {"batch_size": REPORT_BATCH_SIZE}
    train, evaluation = result["train"], result["eval"]
    size = min(REPORT_BATCH_SIZE, train.num_pairs)
    batches = padded.pair_batches(train, batch_size=size, seed=data_config.seed, pad_id=pad_id,
                                  max_length=data_config.max_length,
                                  length_buckets=data_config.length_buckets)
    out["train"] = round(float(np.mean([padded.padding_efficiency(next(batches)) for _ in
                                        range(train.num_pairs // size)])), 4)
    if evaluation.num_pairs:
        out["eval"] = round(float(np.mean([padded.padding_efficiency(b) for b in padded.eval_batches(
            evaluation, batch_size=REPORT_BATCH_SIZE, pad_id=pad_id,
            max_length=data_config.max_length, length_buckets=data_config.length_buckets)])), 4)
    return out
