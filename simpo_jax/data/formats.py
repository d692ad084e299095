"""Reading preference rows (Hub, files, folders, saved datasets) and normalising their formats."""

import csv
import json
import os

from simpo_jax.config.choices import DataFormat
from simpo_jax.errors import HubError, UserError
from simpo_jax.paths import FILE_EXTENSIONS, REPO_ROOT, looks_local, resolve_local

FORMATS = DataFormat.values()


class BadRow(Exception):
    """A row that cannot become a preference pair; `reason` is the report's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- Paths -------------------------------------------------------------------------------------

def missing_path(name_or_path: str) -> UserError:
    """The error for a dataset_mixer entry that names a local path that does not exist."""
    return UserError(
        f"dataset_mixer entry {name_or_path!r}: no such file or folder (looked in the current "
        f"directory {os.getcwd()} and the repository root {REPO_ROOT}). Give a .jsonl/.json/"
        ".parquet/.csv file, a folder of split files (train_prefs.jsonl, test_prefs.jsonl), or a "
        "Hub data set name such as 'HuggingFaceH4/ultrafeedback_binarized'.")


# --- Loading -----------------------------------------------------------------------------------

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
        return read_file(local) if role == "train" else None
    if _is_saved_dataset(local):
        return _load_saved(local, split, role)
    for stem in (split, role):
        for ext in FILE_EXTENSIONS:
            candidate = os.path.join(local, stem + ext)
            if os.path.isfile(candidate):
                return read_file(candidate)
    return None


def read_file(path: str) -> list:
    """Rows of a .jsonl/.json/.parquet/.csv file; UserError naming the file (and line) if unreadable."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".jsonl":
            return _read_jsonl(path)
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                text = f.read()
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


# --- Formats -----------------------------------------------------------------------------------

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
