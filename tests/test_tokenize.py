"""Tokenised pairs: truncation modes and their report, exactly one BOS and a final EOS, pad == eos."""

from simpo_jax.data import padded, pairs as pairs_lib, report as report_lib
from test_data import (DISTINCT, FRESH, GOOD, _config, _enc, _folder, _uf,  # noqa: F401
                       _variant, cache_dir, tok)

LONG = _uf("Please repeat the word: " + " ".join(["apple river green"] * 10) + " end", "end", "apple")
LONG_SWAPPED = _uf(LONG["prompt"], "apple", "end")  # the same lengths, not a duplicate row


def test_truncation_modes(tok, tmp_path, cache_dir):
    path = _folder(tmp_path, [LONG, LONG])
    full = _enc(tok, tok.apply_chat_template(LONG["chosen"][:1], tokenize=False,
                                             add_generation_prompt=True))
    assert len(full) > 20
    d = pairs_lib.build_datasets(_config(path, cache_dir, max_prompt_length=20), tok)
    assert list(d.train.prompt_ids[0]) == [tok.bos_token_id] + full[-19:]
    assert d.report["splits"]["train"]["prompt_truncated"] == 2
    assert d.report["splits"]["train"]["truncated_fraction"] == 1.0
    d = pairs_lib.build_datasets(_config(path, cache_dir, max_prompt_length=20,
                                        truncation_mode="keep_start"), tok)
    assert list(d.train.prompt_ids[0]) == full[:20]
    # The completion keeps its start when prompt + completion exceed max_length.
    d = pairs_lib.build_datasets(_config(path, cache_dir, max_prompt_length=20, max_length=21), tok)
    assert list(d.train.chosen_ids[0]) == _enc(tok, "end</s>")[:1]
    # A prompt filling max_length leaves no completion: dropped, never batched.
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "b", GOOD + [LONG]), cache_dir,
                                        max_prompt_length=30, max_length=30), tok)
    assert d.report["splits"]["train"]["dropped"] == {"empty_after_truncation": 1}
    for i in range(d.train.num_pairs):
        assert len(d.train.chosen_ids[i]) and len(d.train.rejected_ids[i])
    batches = padded.pair_batches(d.train, batch_size=2, seed=0, pad_id=0, max_length=30)
    for _ in range(6):
        b = next(batches)
        assert (b.lengths > b.completion_start).all() and (b.lengths <= 30).all()


def test_console_table_shows_truncation_and_warns(tok, tmp_path, cache_dir):
    # 2 of 8 pairs have a prompt over max_prompt_length, leaving 1 token of room for completions.
    path = _folder(tmp_path / "a", GOOD + [LONG, LONG_SWAPPED], test=FRESH)
    d = pairs_lib.build_datasets(_config(path, cache_dir, max_prompt_length=20, max_length=21), tok)
    lines = report_lib.format_report(d.report).splitlines()
    assert lines[0].split() == ["split", "read", "kept", "truncated", "prompts", "truncated",
                                "completions", "dropped"]
    assert lines[1].split() == ["train", "8", "8", "2", "2", "-"]
    assert lines[2].split() == ["eval", "2", "2", "0", "0", "-"]
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert warning.startswith("warning: 25.0% of the train pairs are truncated (2 prompts cut to "
                              "max_prompt_length=20 tokens, 2 completions cut at max_length=21 "
                              "tokens)")
    # 1 truncated pair in 31 (3.2%) is counted but not warned about.
    d = pairs_lib.build_datasets(_config(_folder(tmp_path / "b", DISTINCT[:30] + [LONG],
                                                 test=FRESH), cache_dir, max_prompt_length=20), tok)
    table = report_lib.format_report(d.report)
    assert table.splitlines()[1].split() == ["train", "31", "31", "1", "0", "-"]
    assert "warning" not in table


def test_exactly_one_bos_and_final_eos(tok, tmp_path, cache_dir):
    path = _folder(tmp_path, GOOD)
    ref = pairs_lib.build_datasets(_config(path, cache_dir), tok)
    both = _variant(tok, post_bos=True)
    assert both.encode("apple")[0] == both.bos_token_id  # the tokenizer really adds a BOS itself
    no_bos = _variant(tok, template=tok.chat_template.replace("{{ bos_token }}", ""))
    for t in (both, no_bos):
        d = pairs_lib.build_datasets(_config(path, cache_dir), t)
        assert d.fingerprint == ref.fingerprint
    # A template without EOS after the answer: EOS is appended.
    no_eos = _variant(tok, template="{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
                                    "{{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    d = pairs_lib.build_datasets(_config(path, cache_dir), no_eos)
    assert list(d.train.chosen_ids[0]) == _enc(tok, "apple\n") + [tok.eos_token_id]
    for i in range(d.train.num_pairs):
        assert list(d.train.prompt_ids[i]).count(tok.bos_token_id) == 1
        assert d.train.prompt_ids[i][0] == tok.bos_token_id


def test_pad_equal_to_eos(tok, tmp_path, cache_dir):
    t = _variant(tok, pad_is_eos=True)
    d = pairs_lib.build_datasets(_config(_folder(tmp_path, GOOD), cache_dir), t)
    assert d.pad_id == tok.eos_token_id
    b = next(padded.pair_batches(d.train, batch_size=4, seed=0, pad_id=d.pad_id, max_length=128))
    for row in range(4):
        for k in range(2):
            n, s = b.lengths[row, k], b.completion_start[row, k]
            completion = b.input_ids[row, k, s:n]
            assert completion[-1] == tok.eos_token_id and (completion[:-1] != tok.eos_token_id).all()
            assert (b.input_ids[row, k, n:] == tok.eos_token_id).all()
