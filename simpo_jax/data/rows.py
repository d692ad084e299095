"""Where preference rows come from: files, folders, saved data sets and the Hub, over the mixer.

Also the prompt reader of on-policy generation (unique prompts of a split).
"""

from __future__ import annotations

import csv
import json
import os

from simpo_jax.data import formats, report
from simpo_jax.errors import HubError, UserError
from simpo_jax.paths import FILE_EXTENSIONS, REPO_ROOT, looks_local, resolve_local


def missing_path(name_or_path: str) -> UserError:
    """The error for a dataset_mixer entry that names a local path that does not exist."""
    return UserError(
        f"dataset_mixer entry {name_or_path!r}: no such file or folder (looked in the current "
        f"directory {os.getcwd()} and the repository root {REPO_ROOT}). Give a .jsonl/.json/"
        ".parquet/.csv file, a folder of split files (train_prefs.jsonl, test_prefs.jsonl), or a "
        "Hub data set name such as 'HuggingFaceH4/ultrafeedback_binarized'.")


def check_paths(dataset_mixer) -> None:
    """Raises UserError for a dataset_mixer entry naming a local path that does not exist.

    Reads nothing and asks no server, so a run can call it before anything is loaded.
    """
    for name in dataset_mixer:
        if looks_local(name) and resolve_local(name) is None:
            raise missing_path(name)


def mixer_items(dataset_mixer) -> tuple:
    """config.dataset_mixer (a dict or ConfigDict) -> ((name_or_path, amount), ...) in order."""
    mixer = dataset_mixer.to_dict() if hasattr(dataset_mixer, "to_dict") else dict(dataset_mixer)
    return tuple(mixer.items())


def mixer_rows(mixer: tuple, split: str, *, role: str, cache_dir: str):
    """(name, rows or None) of one split per mixer entry; training rows cut to the entry's share:
    a fraction (<= 1) of the split or a row count (> 1), from its start."""
    for name, amount in mixer:
        rows = load_split(name, split, role=role, cache_dir=cache_dir)
        if rows is not None and role == "train":
            n = int(amount * len(rows)) if amount <= 1 else min(int(amount), len(rows))
            rows = rows.select(range(n)) if hasattr(rows, "select") else rows[:n]
        yield name, rows


def load_split(name_or_path: str, split: str, *, role: str, cache_dir: str):
    """Rows (an iterable of dicts) of one split of one mixer entry; None when it has no such split.

    `role` is "train" or "test": folders fall back to train.* / test.* files and saved DatasetDicts
    to their "train" / "test" splits.
    """
    local = resolve_local(name_or_path)
    if local is None:
        if looks_local(name_or_path):
            raise missing_path(name_or_path)
        return _load_hub(name_or_path, split, cache_dir)
    if os.path.isfile(local):
        # A single file is the training split only.
        return _read_data_file(local) if role == "train" else None
    if _is_saved_dataset(local):
        return _load_saved(local, split, role)
    for stem in (split, role):
        for ext in FILE_EXTENSIONS:
            candidate = os.path.join(local, stem + ext)
            if os.path.isfile(candidate):
                return _read_data_file(candidate)
    return None


def _read_data_file(path: str) -> list:
    """read_file for a data set's split: an empty file (no rows, or only whitespace) is an error."""
    rows = read_file(path)
    if not len(rows):
        raise UserError(f"{path} is empty: it holds no rows. Fill it with preference rows, or "
                        "remove it (or its dataset_mixer entry).")
    return rows


def read_file(path: str) -> list:
    """Rows of a .jsonl/.json/.parquet/.csv file ([] if it has none); UserError naming the file
    (and line) if unreadable."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".jsonl":
            return _read_jsonl(path)
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if not text.strip():
                return []
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                if text.lstrip().startswith("{") and "\n" in text.strip():
                    return _read_jsonl(path)  # JSON lines saved as .json
                raise UserError(f"Cannot parse {path}: line {err.lineno}, column {err.colno}: "
                                f"{err.msg}") from err
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise UserError(f"Cannot read {path}: expected a JSON list of rows (or JSON lines), "
                                f"got a JSON {type(data).__name__}.")
            return data
        if ext == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        if ext == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return [{k: _csv_cell(v) for k, v in row.items() if k is not None}
                        for row in csv.DictReader(f)]
    except UserError:
        raise
    except Exception as err:  # pyarrow, csv and unicode errors: name the file
        first = (str(err).splitlines() or [""])[0][:300]
        raise UserError(f"Cannot read {path}: {type(err).__name__}: {first}") from err
    raise UserError(f"Cannot read {path}: unknown extension {ext!r}; use one of {FILE_EXTENSIONS}.")


def _read_jsonl(path: str) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"Cannot parse {path}: line {lineno}, column {err.colno}: "
                                f"{err.msg}") from err
    return rows


def _csv_cell(value):
    """CSV has only strings: cells holding JSON lists (message lists) are decoded, '' is null."""
    if value is None or value == "":
        return None
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def _is_saved_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f))
               for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _load_saved(folder: str, split: str, role: str):
    import datasets
    saved = datasets.load_from_disk(folder)
    if isinstance(saved, datasets.DatasetDict):
        for name in (split, role):
            if name in saved:
                return saved[name]
        return None
    return saved if role == "train" else None


def _load_hub(name: str, split: str, cache_dir: str):
    import datasets
    offline = bool(datasets.config.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir or None)
    except ValueError as err:
        if "Unknown split" in str(err):
            return None
        raise _hub_error(name, offline, err) from err
    except Exception as err:
        raise _hub_error(name, offline, err) from err


def _hub_error(name: str, offline: bool, err: Exception) -> UserError:
    why = ("the Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the "
           "datasets cache") if offline else f"{type(err).__name__}: {_one_line(str(err))}"
    return HubError(
        f"Cannot load dataset {name!r} from the Hugging Face Hub: {why}. To train on local data, set "
        f"dataset_mixer to a local path instead: a .jsonl/.json/.parquet/.csv file, a folder with "
        f"train_prefs.jsonl and test_prefs.jsonl (or train.jsonl/test.jsonl), or a folder written by "
        f"Dataset.save_to_disk; e.g. --config.dataset_mixer='{{\"/data/prefs\": 1.0}}'.")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300].rstrip(".")


def read_split(data_config, split, role: str):
    """Normalised records of one split over the mixer, and its report (rows read, drops)."""
    split_report = report.new_split(split)
    records = []
    if split is None:
        return records, split_report
    for name, rows in mixer_rows(data_config.dataset_mixer, split,
                                 role="train" if role == "train" else "test",
                                 cache_dir=data_config.dataset_cache_dir):
        if rows is None and role == "train":
            raise _no_train_split(name, split)
        if rows is None:
            continue
        if not len(rows):
            raise _no_rows(name, split, role, dict(data_config.dataset_mixer)[name])
        fmt = formats.detect_format(rows, data_config.data_format)
        split_report["formats"][name] = fmt
        for i, row in enumerate(rows):
            split_report["rows_read"] += 1
            label = f"{name}:{split}:{i}"
            try:
                rec = formats.normalise(row, fmt)
            except formats.BadRow as bad:
                report.drop(split_report, bad.reason, label)
                continue
            if rec["chat"]:
                rec["prompt"] = json.dumps(rec["prompt"], ensure_ascii=False)
            rec["source"] = label
            records.append(rec)
    return records, split_report


def _no_rows(name: str, split: str, role: str, amount) -> UserError:
    share = (f" after taking its share ({amount}: a fraction <= 1 of the split, or a row count)"
             if role == "train" else "")
    return UserError(f"dataset_mixer entry {name!r}: split {split!r} has no rows{share}. Give "
                     f"it rows{', or raise its share' if share else ''}.")


def _no_train_split(name: str, split: str) -> UserError:
    local = resolve_local(name)
    where = (f"{local} has no {split!r} or 'train' split (a {split}.* or train.* file, * = "
             f"{'/'.join(e[1:] for e in FILE_EXTENSIONS)}, or a split of a saved data set)"
             if local else f"the data set has no split {split!r}")
    return UserError(f"dataset_mixer entry {name!r}: {where}. The training split is the first "
                     "name containing 'train' in config.dataset_splits; every entry needs it.")


def load_prompts(config, role: str) -> list[dict]:
    """Unique prompts {prompt_id, messages, prompt, chosen} of one split over config.dataset_mixer.

    role "train": the first split with "train" in its name, the mixer's share applied;
    role "test": the first with "test" in its name, whole. First occurrence wins.
    """
    names = [s for s in config.dataset_splits if role in s]
    if not names:
        raise UserError(f"config.dataset_splits={list(config.dataset_splits)} names no {role} "
                        "split.")
    out, seen = [], set()
    for _, rows in mixer_rows(mixer_items(config.dataset_mixer), names[0], role=role,
                              cache_dir=config.dataset_cache_dir):
        if rows is None:
            continue
        for row in rows:
            messages = formats.prompt_messages(row)
            if messages is None:
                continue
            pid = formats.prompt_id(messages)
            if pid in seen:
                continue
            seen.add(pid)
            user = [m["content"] for m in messages if m["role"] == "user"]
            out.append({"prompt_id": pid, "messages": messages,
                        "prompt": user[-1] if user else messages[-1]["content"],
                        "chosen": formats.chosen_answer(row)})
    return out
