"""Data hygiene: pairs identical after truncation, duplicate rows, train/test overlap, empty files,
refused chat templates, and the tokenisation cache of older rules."""

import pytest

from simpo_jax.data import pairs as pairs_lib, report as report_lib
from simpo_jax.data import tokenize as tokenize_lib
from simpo_jax.errors import UserError
from test_data import (DISTINCT, FRESH, GOOD, TOKENIZER, _config, _enc, _folder, _uf,  # noqa: F401
                       _variant, cache_dir, tok)

SHARED = [_uf("Please repeat the word: " + w, "one two three four five six seven " + w,
              "one two three four five six seven " + r) for w, r in (("apple", "river"),
                                                                      ("green", "house"))]


def test_pairs_identical_after_truncation_dropped_as_own_reason(tok, tmp_path, cache_dir):
    # The completions share 7 words; 8 tokens of room leave identical chosen and rejected ids.
    room = len(_enc(tok, tok.apply_chat_template(SHARED[0]["chosen"][:1], tokenize=False,
                                                 add_generation_prompt=True))) + 8
    path = _folder(tmp_path / "a", GOOD + SHARED, test=FRESH + SHARED[:1])
    d = pairs_lib.build_datasets(_config(path, cache_dir, max_length=room,
                                        max_dropped_fraction=0.05), tok)  # 2 of 8 > 5%: not counted
    train, evaluation = d.report["splits"]["train"], d.report["splits"]["eval"]
    assert train["dropped"] == {"identical_after_truncation": 2} and train["rows_kept"] == 6
    assert evaluation["dropped"] == {"identical_after_truncation": 1}
    assert train["dropped_fraction"] == 0.0 and train["dropped_by_length_budget"] == 2
    assert train["dropped_examples"]["identical_after_truncation"] == [f"{path}:train_prefs:6",
                                                                      f"{path}:train_prefs:7"]
    for i in range(d.train.num_pairs):
        assert list(d.train.chosen_ids[i]) != list(d.train.rejected_ids[i])
    warnings = [w for w in report_lib.format_report(d.report).splitlines()
                if w.startswith("warning:") and "identical" in w]
    assert warnings[0].startswith("warning: 2 of the 8 train pairs (25.0%) were dropped: chosen "
                                  "and rejected are identical after truncation")
    assert f"max_length={room}" in warnings[0] and "max_prompt_length=64" in warnings[0]
    # Room for the whole completions: nothing dropped, no warning.
    d = pairs_lib.build_datasets(_config(path, cache_dir, max_length=room + 32), tok)
    assert d.report["splits"]["train"]["dropped"] == {}
    assert "identical" not in report_lib.format_report(d.report)
    # Every pair identical: no training pairs, and the message says why.
    with pytest.raises(UserError, match=r"No training pairs.*identical_after_truncation: 2.*"
                                        r"Raise max_length=\d+, or lower max_prompt_length=64"):
        pairs_lib.build_datasets(_config(_folder(tmp_path / "b", SHARED), cache_dir,
                                        max_length=room), tok)


def test_tokenisation_cache_of_older_rules_is_not_reused(tok, tmp_path, cache_dir, monkeypatch):
    room = len(_enc(tok, tok.apply_chat_template(SHARED[0]["chosen"][:1], tokenize=False,
                                                 add_generation_prompt=True))) + 8
    cfg = _config(_folder(tmp_path, GOOD + SHARED), str(tmp_path / "cache"), max_length=room)
    with monkeypatch.context() as m:  # the rules of simpo_jax-data-1: identical pairs were kept
        m.setattr(pairs_lib, "CACHE_VERSION", "simpo_jax-data-1")
        real = pairs_lib.tokenize_pair
        m.setattr(pairs_lib, "tokenize_pair", lambda *a, **k: {**real(*a, **k), "drop_reason": ""})
        assert pairs_lib.build_datasets(cfg, tok).train.num_pairs == 8
    assert pairs_lib.build_datasets(cfg, tok).train.num_pairs == 6


def test_duplicates_and_train_test_overlap_counted_and_warned(tok, tmp_path, cache_dir):
    other_answers = _uf(GOOD[1]["prompt"], "green", "blue")
    path = _folder(tmp_path / "a", GOOD + GOOD[:2], test=[GOOD[0], other_answers] + FRESH)
    d = pairs_lib.build_datasets(_config(path, cache_dir), tok)
    train, evaluation = d.report["splits"]["train"], d.report["splits"]["eval"]
    assert train["rows_kept"] == 8 and d.train.num_pairs == 8  # duplicates still train
    assert (train["duplicate_rows"], evaluation["duplicate_rows"]) == (2, 0)
    assert d.report["train_test_overlap"] == {"pairs": 1, "prompts": 2, "eval_rows": 4}
    warnings = [w for w in report_lib.format_report(d.report).splitlines()
                if w.startswith("warning:")]
    assert warnings == [
        "warning: 2 of the 8 train rows (25.0%) repeat an earlier row of the split exactly "
        "(prompt, chosen and rejected); they are kept, so those pairs weigh more; deduplicate the "
        "data if that is not intended.",
        "warning: 1 of the 4 eval rows (25.0%) are also train rows (same prompt, chosen and "
        "rejected): eval metrics on them measure memorisation; remove them from one split.",
        "warning: 2 of the 4 eval rows (50.0%) have a prompt that is also in the train split: "
        "eval metrics do not measure unseen prompts."]
    # At most 1% (1 duplicate in 101 rows, no overlap): counted, not warned about.
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "b", DISTINCT + DISTINCT[:1],
                                                 test=FRESH), cache_dir), tok)
    assert d.report["splits"]["train"]["duplicate_rows"] == 1
    assert d.report["train_test_overlap"] == {"pairs": 0, "prompts": 0, "eval_rows": 2}
    assert "warning" not in report_lib.format_report(d.report)


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("w.json", " \n"),
                                       ("h.csv", "prompt,chosen,rejected\n"), ("e.parquet", None)])
def test_empty_file_named_as_empty(name, text, tok, tmp_path, cache_dir):
    path = tmp_path / name
    if text is None:
        import datasets
        datasets.Dataset.from_dict({"prompt": [], "chosen": []}).to_parquet(str(path))
    else:
        path.write_text(text)
    with pytest.raises(UserError, match=rf"^{path} is empty: it holds no rows\.") as err:
        pairs_lib.build_datasets(_config(str(path), cache_dir), tok)
    assert "\n" not in str(err.value)
    # The empty test split of a folder is named too.
    folder = _folder(tmp_path / "f", GOOD)
    (tmp_path / "f" / "test_prefs.jsonl").write_text("")
    with pytest.raises(UserError, match=r"test_prefs\.jsonl is empty"):
        pairs_lib.build_datasets(_config(folder, cache_dir), tok)


def test_split_without_rows_after_the_mixer_share_named(tok, tmp_path, cache_dir):
    path = _folder(tmp_path, GOOD)
    with pytest.raises(UserError, match=rf"^dataset_mixer entry '{path}': split 'train_prefs' has "
                                        r"no rows after taking its share \(0\.1: "):  # of 6 rows
        pairs_lib.build_datasets(_config({path: 0.1}, cache_dir), tok)


def test_chat_template_refusal_is_one_line(tok, tmp_path, cache_dir):
    path = _folder(tmp_path, GOOD)
    unsafe = "{{ bos_token }}{% for m in messages %}{{ m.content.__class__.__name__ }}{% endfor %}"
    with pytest.raises(UserError) as err:
        pairs_lib.build_datasets(_config(path, cache_dir, preprocessing_num_workers=2),
                                 _variant(tok, template="{{ messages.append(1) }}"))
    msg = str(err.value)
    assert msg.startswith(f"The chat template of the tokenizer loaded from "
                          f"'{TOKENIZER}' cannot be rendered: SecurityError: access to attribute "
                          "'append' of 'list' object is unsafe")
    assert "\n" not in msg and "chat_template" in msg
    refused = r"^config.chat_template='\{\{ bos_token.*' cannot be rendered: SecurityError: "
    with pytest.raises(UserError, match=refused + "access to attribute '__class__'"):
        pairs_lib.build_datasets(_config(path, cache_dir, chat_template=unsafe),
                                 _variant(tok, template=unsafe))
    with pytest.raises(UserError, match="cannot be rendered: SecurityError"):  # on-policy prompts
        tokenize_lib.prompt_token_ids(_variant(tok, template=unsafe), GOOD[0]["chosen"][:1], 32,
                                      "keep_end")
