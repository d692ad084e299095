"""The preference-data pipeline: formats, bad rows, exact tokens, report, batching."""

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from simpo_jax.data import padded, pairs as pairs_lib, report as report_lib, rows as rows_lib
from simpo_jax.data import tokenize as tokenize_lib
from simpo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "tiny_tokenizer")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny(tok, cache_dir):
    return pairs_lib.build_datasets(_config("assets/tiny_prefs", cache_dir, max_length=64,
                                           max_prompt_length=48), tok)


def _config(path, cache_dir, **kw):
    """The DataConfig of configs/base.py with this mixer and cache, and `kw` set."""
    from configs import base
    mixer = path if isinstance(path, dict) else {path: 1.0}
    return dataclasses.replace(pairs_lib.DataConfig.from_config(base.get_config()),
                               dataset_mixer=tuple(mixer.items()), dataset_cache_dir=cache_dir,
                               **{"max_length": 128, "max_prompt_length": 64,
                                  "max_dropped_fraction": 1.0, **kw})


def _uf(prompt, chosen, rejected):
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "prompt_id": "x", "score_chosen": 9.0, "score_rejected": 1.0,
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


GOOD = [_uf(f"Please repeat the word: {w}", w, r) for w, r in
        [("apple", "river"), ("green", "house"), ("music", "table"), ("window", "garden"),
         ("yellow", "orange"), ("silver", "winter")]]

DISTINCT = [_uf(f"Please repeat the word: w{i}", f"w{i}", "x") for i in range(100)]
FRESH = [_uf(f"Please repeat the word: {w}", w, r) for w, r in
         (("river", "apple"), ("house", "green"))]  # prompts and pairs not in GOOD


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def _folder(tmp_path, train, test=GOOD[:2], names=("train_prefs", "test_prefs")):
    tmp_path.mkdir(exist_ok=True)
    _jsonl(tmp_path / f"{names[0]}.jsonl", train)
    _jsonl(tmp_path / f"{names[1]}.jsonl", test)
    return str(tmp_path)


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _variant(tok, *, template=None, post_bos=False, pad_is_eos=False):
    from tokenizers import processors
    t = copy.deepcopy(tok)
    if template is not None:
        t.chat_template = template
    if post_bos:
        t.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    if pad_is_eos:
        t.pad_token = t.eos_token
    return t


# --- Exact tokens --------------------------------------------------------------------------------

def test_exact_tokens_and_batch_masks(tok, tmp_path, cache_dir):
    data = pairs_lib.build_datasets(_config(_folder(tmp_path, GOOD), cache_dir), tok)
    assert data.train.num_pairs == len(GOOD) and data.eval.num_pairs == 2
    prompt = _enc(tok, "<s><|user|>\nPlease repeat the word: apple</s>\n<|assistant|>\n")
    assert list(data.train.prompt_ids[0]) == prompt and prompt.count(tok.bos_token_id) == 1
    # The template's newline after EOS is cut: completions end with EOS.
    assert list(data.train.chosen_ids[0]) == _enc(tok, "apple</s>")
    assert list(data.train.rejected_ids[0]) == _enc(tok, "river</s>")
    from simpo_jax.data.padded import make_batch
    batch = make_batch(data.train, np.array([0, 1]), np.ones(2), data.pad_id, 32)
    start, lengths, ids = batch.completion_start, batch.lengths, batch.input_ids
    assert ids.dtype == np.int32 and ids.shape == (2, 2, 32)
    assert list(ids[0, 0, :lengths[0, 0]]) == prompt + _enc(tok, "apple</s>")
    assert list(ids[0, 1, start[0, 1]:lengths[0, 1]]) == _enc(tok, "river</s>")
    assert (ids[0, 0, lengths[0, 0]:] == tok.pad_token_id).all()
    assert padded.padding_efficiency(batch) == pytest.approx(lengths.sum() / ids.size)


def test_assistant_header_in_completion(tok, tmp_path, cache_dir):
    data = pairs_lib.build_datasets(_config(_folder(tmp_path, GOOD), cache_dir,
                                           assistant_header_in="completion"), tok)
    assert list(data.train.prompt_ids[0]) == _enc(
        tok, "<s><|user|>\nPlease repeat the word: apple</s>\n")
    assert list(data.train.chosen_ids[0]) == _enc(tok, "<|assistant|>\napple</s>")


def test_multi_turn_prompt_is_every_turn_before_final_answer(tok, tmp_path, cache_dir):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple"},
             {"role": "assistant", "content": "apple"}, {"role": "user", "content": "Again"}]
    row = {"chosen": turns + [{"role": "assistant", "content": "apple"}],
           "rejected": turns + [{"role": "assistant", "content": "pear"}]}
    bad = {"chosen": row["chosen"], "rejected": turns[:2] + [
        {"role": "assistant", "content": "no"}] + turns[3:] + [{"role": "assistant", "content": "x"}]}
    data = pairs_lib.build_datasets(_config(_folder(tmp_path, [row, row, bad]), cache_dir), tok)
    assert list(data.train.prompt_ids[0]) == _enc(tok, tok.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True))
    assert list(data.train.rejected_ids[0]) == _enc(tok, "pear</s>")
    assert data.report["splits"]["train"]["dropped"] == {"mismatched_turns": 1}
    assert data.report["splits"]["train"]["formats"] == {str(tmp_path): "messages"}


def test_other_formats(tok, tmp_path, cache_dir):
    math = [{"instruction": "1+1?", "chosen_response": "2", "rejected_response": "3"}] * 2
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "m", math), cache_dir), tok)
    assert d.report["splits"]["train"]["formats"] == {str(tmp_path / "m"): "distilabel_math"}
    assert list(d.train.prompt_ids[0]) == _enc(tok, "<s><|user|>\n1+1?</s>\n<|assistant|>\n")
    # Plain text: no template; the prompt gets one BOS, completions only an EOS.
    plain = [{"prompt": "<s>Q: say x\nA:", "chosen": " x", "rejected": " y"},
             {"prompt": "Q: say y\nA:", "chosen": " y", "rejected": " z</s>"}]
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "p", plain), cache_dir), tok)
    assert list(d.train.prompt_ids[0]) == [tok.bos_token_id] + _enc(tok, "Q: say x\nA:")
    assert list(d.train.prompt_ids[1]) == [tok.bos_token_id] + _enc(tok, "Q: say y\nA:")
    assert list(d.train.chosen_ids[0]) == _enc(tok, " x") + [tok.eos_token_id]
    assert list(d.train.rejected_ids[1]) == _enc(tok, " z</s>")
    # Argilla-style: message lists without a prompt column.
    argilla = [{k: v for k, v in r.items() if k != "prompt"} for r in GOOD]
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "a", argilla), cache_dir), tok)
    assert list(d.train.prompt_ids[0]) == _enc(
        tok, "<s><|user|>\nPlease repeat the word: apple</s>\n<|assistant|>\n")
    # TRL's explicit-prompt conversational format: prompt messages, one-message completions.
    trl = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [
        {"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}]
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "t", trl), cache_dir), tok)
    assert list(d.train.prompt_ids[0]) == _enc(tok, "<s><|user|>\nHi</s>\n<|assistant|>\n")


# --- File kinds ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "plain_names", "saved"])
def test_file_kinds_give_same_pairs(kind, tok, tmp_path, cache_dir):
    import datasets
    ref = pairs_lib.build_datasets(_config(_folder(tmp_path / "ref", GOOD), cache_dir), tok)
    if kind == "jsonl":
        path = _jsonl(tmp_path / "d.jsonl", GOOD)
    elif kind == "json":
        path = str(tmp_path / "d.json")
        json.dump(GOOD, open(path, "w"))
    elif kind == "parquet":
        path = str(tmp_path / "d.parquet")
        datasets.Dataset.from_list(GOOD).to_parquet(path)
    elif kind == "csv":
        import csv
        path = str(tmp_path / "d.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(GOOD[0]))
            w.writeheader()
            w.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                         for r in GOOD])
    elif kind == "plain_names":
        path = _folder(tmp_path / "f", GOOD, names=("train", "test"))
    else:
        path = str(tmp_path / "saved")
        datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(GOOD),
                              "test_prefs": datasets.Dataset.from_list(GOOD[:2])}).save_to_disk(path)
    d = pairs_lib.build_datasets(_config(path, cache_dir), tok)
    assert d.fingerprint == ref.fingerprint
    assert d.eval.num_pairs == (2 if kind in ("plain_names", "saved") else 0)  # a file is train only


def test_relative_path_resolves_against_repo_root(tok, tiny, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config("assets/tiny_prefs", cache_dir, max_length=64, max_prompt_length=48)
    assert pairs_lib.build_datasets(cfg, tok).fingerprint == tiny.fingerprint
    assert len(tokenize_lib.load_tokenizer(_config("x", "", tokenizer_name_or_path="assets/tiny_tokenizer")))


def test_mixer_fraction_and_count(tok, tmp_path, cache_dir):
    path = _folder(tmp_path, GOOD)
    assert pairs_lib.build_datasets(_config({path: 0.5}, cache_dir), tok).train.num_pairs == 3
    d = pairs_lib.build_datasets(_config({path: 4}, cache_dir), tok)
    assert (d.train.num_pairs, d.eval.num_pairs) == (4, 2)
    # The run config checks the amounts (DataConfig repeats no check of it), before data is read.
    from configs import tiny
    from simpo_jax import config as config_lib
    config = tiny.get_config()
    config.dataset_mixer = {path: 2.5}
    with pytest.raises(ValueError, match="dataset_mixer"):
        config_lib.validate(config)


# --- Bad rows, report, errors --------------------------------------------------------------------

BAD = [
    {"prompt": "p", "rejected": GOOD[0]["rejected"]},  # missing_field
    {**GOOD[0], "chosen": None},  # missing_field
    {**GOOD[0], "chosen": 3},  # wrong_type
    {**GOOD[0], "rejected": [{"role": "user", "content": 1}]},  # wrong_type
    "[1, 2]",  # wrong_type: not an object
    _uf("Please repeat", "  ", "x"),  # empty_text
    _uf("Please repeat", "same", "same"),  # identical_chosen_rejected
]


def test_bad_rows_counted_by_reason(tok, tmp_path, cache_dir):
    d = pairs_lib.build_datasets(_config(_folder(tmp_path, GOOD + BAD), cache_dir), tok)
    s = d.report["splits"]["train"]
    assert (s["rows_read"], s["rows_kept"]) == (13, 6)
    assert s["dropped"] == {"missing_field": 2, "wrong_type": 3, "empty_text": 1,
                            "identical_chosen_rejected": 1}
    assert s["dropped_examples"]["empty_text"] == [f"{tmp_path}:train_prefs:11"]
    path = report_lib.write_report(d.report, str(tmp_path / "out"))
    assert json.load(open(path))["splits"]["train"]["dropped"]["wrong_type"] == 3


def test_dropped_fraction_error(tok, tmp_path, cache_dir):
    with pytest.raises(UserError) as err:
        pairs_lib.build_datasets(_config(_folder(tmp_path, GOOD + BAD), cache_dir,
                                        max_dropped_fraction=0.05), tok)
    msg = str(err.value)
    assert "53.8%" in msg and "max_dropped_fraction=0.05" in msg and "wrong_type: 3" in msg
    assert f"{tmp_path}:train_prefs:8" in msg


def test_unparsable_file_names_file_and_line(tok, tmp_path, cache_dir):
    path = _jsonl(tmp_path / "broken.jsonl", [GOOD[0], '{"prompt": "x", oops}'])
    with pytest.raises(UserError, match=r"broken\.jsonl: line 2"):
        pairs_lib.build_datasets(_config(path, cache_dir), tok)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"bad\.parquet"):
        pairs_lib.build_datasets(_config(str(tmp_path / "bad.parquet"), cache_dir), tok)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')  # not UTF-8
    with pytest.raises(UserError, match=r"latin1\.jsonl: UnicodeDecodeError"):
        pairs_lib.build_datasets(_config(str(tmp_path / "latin1.jsonl"), cache_dir), tok)


def test_offline_hub_name_error(tok, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"'nobody-here/no_such_prefs'.*local path"):
        pairs_lib.build_datasets(_config("nobody-here/no_such_prefs", cache_dir), tok)


def test_missing_local_path_fails_before_anything_is_read(tok, cache_dir):
    missing = r"dataset_mixer entry 'data/missing\.jsonl': no such file or folder"
    with pytest.raises(UserError, match=missing):
        pairs_lib.build_datasets(_config("data/missing.jsonl", cache_dir), tok)
    with pytest.raises(UserError, match=missing):  # the check a run makes before loading anything
        rows_lib.check_paths({"assets/tiny_prefs": 1.0, "data/missing.jsonl": 1.0})
    rows_lib.check_paths({"assets/tiny_prefs": 1.0, "HuggingFaceH4/ultrafeedback_binarized": 1.0})


def test_data_mistakes_are_user_errors(tok, tmp_path, cache_dir):
    # A folder without a training split is an error, not a mixer entry that adds nothing.
    (tmp_path / "only_test").mkdir()
    _jsonl(tmp_path / "only_test" / "test_prefs.jsonl", GOOD)
    with pytest.raises(UserError, match=r"only_test'.*no 'train_prefs' or 'train' split"):
        pairs_lib.build_datasets(_config({str(tmp_path / "only_test"): 1.0,
                                         "assets/tiny_prefs": 1.0}, cache_dir), tok)
    no_template = _variant(tok)
    no_template.chat_template = None
    with pytest.raises(UserError, match="no chat template.*chat_template"):
        pairs_lib.build_datasets(_config(_folder(tmp_path / "g", GOOD), cache_dir), no_template)
    with pytest.raises(UserError, match=r"No training pairs.*all 2 rows were dropped \(missing_field"):
        pairs_lib.build_datasets(_config(_folder(tmp_path / "b", [{"prompt": "x"}] * 2), cache_dir,
                                        data_format="plain"), tok)
    with pytest.raises(UserError, match="chat_template='missing.jinja': no such file"):
        tokenize_lib.chat_template_text("missing.jinja")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(UserError, match=r"tokenizer_name_or_path=.*empty_folder.*no tokenizer loads"):
        tokenize_lib.load_tokenizer(_config("x", "", tokenizer_name_or_path=str(tmp_path / "empty_folder")))


# --- Batching ------------------------------------------------------------------------------------

def _take(it, n):
    return [next(it) for _ in range(n)]


def _eq(a, b):
    return type(a) is type(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_order_deterministic_and_resumable(tiny):
    kw = dict(batch_size=16, pad_id=tiny.pad_id, max_length=64)
    spe = padded.PaddedBatcher(mesh=None, global_batch=16, max_length=64, length_buckets=(),
                               seed=1, group_by_length=False, pairs=tiny.train,
                               pad_id=tiny.pad_id).steps_per_epoch
    assert spe == 3000 // 16
    run = _take(padded.pair_batches(tiny.train, seed=1, **kw), spe + 5)
    again = _take(padded.pair_batches(tiny.train, seed=1, **kw), spe + 5)
    assert all(_eq(a, b) for a, b in zip(run, again))
    assert not _eq(run[0], next(padded.pair_batches(tiny.train, seed=2, **kw)))
    for k in (7, spe - 1, spe + 2):
        resumed = _take(padded.pair_batches(tiny.train, seed=1, start_step=k, **kw), 3)
        assert all(_eq(a, b) for a, b in zip(resumed, run[k:k + 3]))
    # One epoch sees distinct pairs; epochs differ in order.
    order = padded.epoch_order(tiny.train.lengths(), 16, 1, 0)
    assert order.shape == (spe, 16) and len(np.unique(order)) == spe * 16
    assert not np.array_equal(order, padded.epoch_order(tiny.train.lengths(), 16, 1, 1))
    # The tiny pairs (17-29 tokens) pad to their batch's longest rounded up to 32 (padded.py).
    assert all(b.input_ids.shape == (16, 2, 32) and b.pair_mask.all() for b in run)


def test_length_bucketing_cuts_padding(tiny):
    kw = dict(batch_size=16, seed=0, pad_id=tiny.pad_id, max_length=64, length_buckets=(16, 24, 32, 64))
    batches = _take(padded.pair_batches(tiny.train, **kw), 50)
    assert {b.input_ids.shape[-1] for b in batches} <= {16, 24, 32}
    assert np.mean([padded.padding_efficiency(b) for b in batches]) > 0.55


def test_processes_read_disjoint_slices_of_global_batch(tiny):
    kw = dict(seed=3, start_step=4, pad_id=tiny.pad_id, max_length=64)
    glob = _take(padded.pair_batches(tiny.train, batch_size=16, **kw), 3)
    parts = [_take(padded.pair_batches(tiny.train, batch_size=8, process_index=p,
                                          process_count=2, **kw), 3) for p in range(2)]
    for g, p0, p1 in zip(glob, *parts):
        assert _eq(g, jax.tree.map(lambda x, y: np.concatenate([x, y]), p0, p1))
        assert not np.array_equal(p0.input_ids, p1.input_ids)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_pair_once(tiny, process_count):
    n = tiny.eval.num_pairs
    seen = []
    for p in range(process_count):
        for b in padded.eval_batches(tiny.eval, batch_size=64 // process_count, pad_id=tiny.pad_id,
                                       max_length=64, process_index=p, process_count=process_count):
            assert b.input_ids.shape[0] == 64 // process_count
            for row in np.nonzero(b.pair_mask)[0]:
                seen.append(b.input_ids[row, 0, :b.lengths[row, 0]].tolist())
    expected = [np.concatenate([tiny.eval.prompt_ids[i], tiny.eval.chosen_ids[i]]).tolist()
                for i in range(n)]
    assert sorted(seen) == sorted(expected) and len(seen) == n


def test_report_and_cache(tok, tiny, cache_dir, tmp_path):
    s = tiny.report["splits"]
    assert (s["train"]["rows_kept"], s["eval"]["rows_kept"]) == (3000, 300)
    assert set(s["train"]["token_lengths"]) == {"prompt", "chosen", "rejected", "total"}
    assert 0 < tiny.report["padding_efficiency"]["train"] <= 1
    assert any(f.endswith(".arrow") for f in os.listdir(os.path.join(cache_dir, "simpo_jax_tokenized")))
    path = _folder(tmp_path, GOOD * 4)
    one = pairs_lib.build_datasets(_config(path, str(tmp_path / "c1")), tok)
    two = pairs_lib.build_datasets(_config(path, str(tmp_path / "c2"), preprocessing_num_workers=2), tok)
    assert one.fingerprint == two.fingerprint
    other = pairs_lib.build_datasets(_config(_folder(tmp_path / "o", GOOD[::-1]), cache_dir), tok)
    assert other.fingerprint != one.fingerprint


def test_from_config_reads_base_fields():
    from configs import tiny
    config = tiny.get_config()
    cfg = pairs_lib.DataConfig.from_config(config)
    assert cfg.dataset_mixer == tuple(dict(config.dataset_mixer).items()) and cfg.max_length == 64
    assert cfg.splits == ("train_prefs", "test_prefs")

