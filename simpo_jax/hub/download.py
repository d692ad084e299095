"""Downloads from the Hub: a model or tokenizer repo id -> a local snapshot folder in the Hugging
Face cache, and an early check that a data set of dataset_mixer can be had."""

from __future__ import annotations

import logging
import os
import re

from simpo_jax.errors import HubError
from simpo_jax.hub import client
from simpo_jax.paths import looks_local, resolve_local

log = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "tokenizer.model.v3", "vocab.json",
                   "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d+-of-\d+\.safetensors")


def resolve_pretrained(name_or_path: str, *, revision: str = "", weights: bool = True,
                       field: str = "model_name_or_path") -> str:
    """A local folder for `name_or_path`: as given if it exists, else a download of that Hub repo.

    Only what a run reads is fetched (config, safetensors weights, tokenizer, chat template), into
    the Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_TOKEN for gated models). In a multi-process
    run process 0 downloads first and the others then fetch the same commit, so no two processes
    on one host write a cache file at once (and each host of a pod fills its own cache).
    """
    local = resolve_local(name_or_path)
    if local is not None:
        if weights:  # the same checks as a download gets, before anything is read
            _needed_files(os.listdir(local) if os.path.isdir(local) else [], weights,
                          f"{field}={name_or_path!r}")
        if revision:
            log.warning("%s=%r is a local folder: revision=%r is ignored.", field, name_or_path,
                        revision)
        return local
    if looks_local(name_or_path) or name_or_path.count("/") > 1:
        raise HubError(f"{field}={name_or_path!r}: no such folder (looked from {os.getcwd()} and "
                       "the repository root). Give a local Hugging Face folder or a Hub repo id "
                       "such as 'mistralai/Mistral-7B-v0.1'.")
    client.bound()
    return _first_on_process_zero(lambda rev: _download(name_or_path, rev, weights, field),
                                  revision)


def _first_on_process_zero(download, revision: str) -> str:
    """Process 0 downloads; the others wait, then fetch the commit process 0 got (from the cache)."""
    import jax

    if jax.process_count() == 1:
        return download(revision)
    import numpy as np
    from jax.experimental import multihost_utils

    path, error = None, None
    if jax.process_index() == 0:
        try:
            path = download(revision)
        except Exception as e:  # told to the others before it is raised here
            error = e
    commit = os.path.basename(path) if path and COMMIT.fullmatch(os.path.basename(path)) else ""
    sent = np.frombuffer((("E" if error is not None else "C") + commit).ljust(41).encode(), np.uint8)
    got = bytes(multihost_utils.broadcast_one_to_all(sent)).decode().strip()
    if got.startswith("E"):
        if error is not None:
            raise error
        raise HubError("Process 0 could not download the model or tokenizer; its log says why.")
    if jax.process_index() != 0:
        path = download(got[1:] or revision)
    multihost_utils.sync_global_devices("simpo_jax hub downloads")
    return path


COMMIT = re.compile(r"[0-9a-f]{40}")


def _download(repo_id: str, revision: str, weights: bool, field: str) -> str:
    """snapshot_download of the files a run needs; each failure is one HubError with its fix."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf_errors

    where = f"{field}={repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    local_fix = (f"To use a local copy instead, set {field} to a folder holding config.json, "
                 "*.safetensors and the tokenizer files.")
    offline = constants.is_offline_mode()
    patterns, commit, unreachable = None, revision or None, ""
    if not offline:
        patterns, commit, unreachable = _listing(repo_id, revision, weights, where, local_fix)
        offline = bool(unreachable)  # the cache may still hold it
    if offline:
        patterns = list(CONFIG_FILES + TOKENIZER_FILES) + ([WEIGHTS_INDEX, "model.safetensors",
                                                           "model-*-of-*.safetensors"]
                                                          if weights else [])
    try:
        path = snapshot_download(repo_id, revision=commit, allow_patterns=patterns,
                                 local_files_only=offline)
    except hf_errors.GatedRepoError:
        raise HubError(_gated(where, repo_id, "your token has no access to it")) from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no such model repo, or no access with this token. "
                       f"{local_fix}") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError) as e:
        if unreachable:
            why = (f"the Hub at {constants.ENDPOINT} cannot be reached ({unreachable}) and the model "
                   f"is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); check the network")
        elif offline:
            why = ("HF_HUB_OFFLINE=1 and the model is not in the Hugging Face cache "
                   f"({constants.HF_HUB_CACHE})")
        else:
            why = f"the download failed ({client.first_line(e)})"
        raise HubError(f"{where}: {why}. {local_fix}") from None
    if weights:  # from the cache alone: nothing listed the repo, so check what came
        _needed_files(os.listdir(path), weights, where)
    return path


def _listing(repo_id: str, revision: str, weights: bool, where: str,
             local_fix: str) -> tuple[list[str] | None, str | None, str]:
    """(the files to fetch, the commit, "") from the repo's listing on the Hub; (None, the
    revision or None, why) when the Hub cannot be reached. Other failures are one HubError."""
    import httpx2
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub import errors as hf_errors

    try:
        info = client.with_retries(lambda: HfApi().model_info(
            repo_id, revision=revision or None, timeout=client.read_timeout()), where)
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:
        return None, revision or None, client.first_line(e)
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repo has no revision {revision!r}; give a branch, tag or "
                       "commit of it (config.revision).") from None
    except hf_errors.RepositoryNotFoundError:
        token = "" if get_token() else " If it is private, log in (hf auth login) or set HF_TOKEN."
        raise HubError(f"{where}: no such model repo on {constants.ENDPOINT}; check the "
                       f"spelling.{token} {local_fix}") from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"{where}: the Hub answered {client.first_line(e)}. {local_fix}") from None
    patterns = _needed_files([s.rfilename for s in info.siblings or ()], weights, where)
    if info.gated and not get_token():
        raise HubError(_gated(where, repo_id, "no Hugging Face token is set"))
    return patterns, info.sha, ""


def check_dataset(name: str) -> None:
    """Fails in a second, with the fix, when a Hub data set of dataset_mixer cannot be had.

    Runs before the model download and tokenisation; offline (HF_HUB_OFFLINE=1), the datasets
    cache decides instead.
    """
    import httpx2
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub import errors as hf_errors

    if constants.is_offline_mode():
        return
    client.bound()
    where = f"dataset_mixer entry {name!r}"
    local_fix = ("Local data work too: a .jsonl/.json/.parquet/.csv file or a folder of split "
                 "files, e.g. --config.dataset_mixer='{\"/data/prefs.v1/train.jsonl\": 1.0}'.")
    try:
        info = client.with_retries(
            lambda: HfApi().dataset_info(name, timeout=client.read_timeout()), where)
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:
        raise HubError(f"{where}: the Hub at {constants.ENDPOINT} cannot be reached "
                       f"({client.first_line(e)}); check the network, or set HF_HUB_OFFLINE=1 to "
                       f"use a copy in the Hugging Face cache. {local_fix}") from None
    except hf_errors.RepositoryNotFoundError:
        token = "" if get_token() else " If it is private, log in (hf auth login) or set HF_TOKEN."
        raise HubError(f"{where}: no such data set on {constants.ENDPOINT}; check the spelling."
                       f"{token} {local_fix}") from None
    except (hf_errors.HfHubHTTPError, hf_errors.HFValidationError) as e:
        raise HubError(f"{where}: {client.first_line(e)}. {local_fix}") from None
    if info.gated and not get_token():
        raise HubError(_gated(where, f"datasets/{name}", "no Hugging Face token is set"))


def _needed_files(files: list[str], weights: bool, where: str) -> list[str]:
    """The repo's top-level files a run reads; a repo without safetensors weights is refused."""
    top = [f for f in files if "/" not in f]
    needed = [f for f in top if f in CONFIG_FILES + TOKENIZER_FILES or f.endswith(".tiktoken")]
    if not weights:
        return needed
    if "config.json" not in top:
        raise HubError(f"{where}: the repo has no config.json, so it is not a transformers model.")
    if WEIGHTS_INDEX in top:
        return needed + [WEIGHTS_INDEX] + [f for f in top if SHARD_PATTERN.fullmatch(f)]
    if "model.safetensors" in top:
        return needed + ["model.safetensors"]
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    raise HubError(
        f"{where}: the repo has no safetensors weights (model.safetensors or {WEIGHTS_INDEX})"
        + (f", only PyTorch pickles ({', '.join(sorted(pickles)[:3])})" if pickles else "")
        + ". simpo_jax never loads pickles: convert them to safetensors (e.g. a 'refs/pr/N' "
        "conversion branch of the repo, given as config.revision), or use a local folder.")


def _gated(where: str, repo_id: str, why: str) -> str:
    from huggingface_hub import constants

    return (f"{where} is gated and {why}: accept its licence at "
            f"{constants.ENDPOINT}/{repo_id}, then log in (hf auth login) or set HF_TOKEN to a "
            "token of that account.")
