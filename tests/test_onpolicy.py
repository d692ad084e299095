"""On-policy data and reward models: reward scores against transformers, pairs from scored
responses, and the generate, rm_eval and train modes on a tiny model (sampling: test_sampling.py)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from configs import tiny
from simpo_jax import cli
from simpo_jax import sharding as sharding_lib
from simpo_jax.errors import UserError
from simpo_jax.data import formats, rows as data_rows
from simpo_jax.onpolicy import generate as generate_lib
from simpo_jax.onpolicy import pairs as pairs_lib
from simpo_jax.onpolicy import reward, rm_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def mesh():
    return sharding_lib.make_mesh(sharding_lib.MeshConfig())


# --- Reward models ---------------------------------------------------------------------------

def hf_reward_model(folder, family, **overrides):
    torch.manual_seed(0)
    common = dict(COMMON, num_labels=1, **overrides)
    if family == "llama":
        model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**common))
    elif family == "mistral":
        model = transformers.MistralForSequenceClassification(transformers.MistralConfig(
            sliding_window=4, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(**common))
    elif family == "qwen3":
        model = transformers.Qwen3ForSequenceClassification(transformers.Qwen3Config(
            head_dim=16, **common))
    elif family == "olmo2":
        model = transformers.Olmo2ForSequenceClassification(transformers.Olmo2Config(**common))
    elif family == "gemma3_text":
        model = transformers.Gemma3TextForSequenceClassification(transformers.Gemma3TextConfig(
            head_dim=16, sliding_window=4, query_pre_attn_scalar=16, **common))
    else:
        model = transformers.Gemma2ForSequenceClassification(transformers.Gemma2Config(
            head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, query_pre_attn_scalar=16, **common))
    with torch.no_grad():  # larger scores, so a wrong token or position shows
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(folder)
    return model.eval()


def hf_padded(seqs, side):
    t = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), t), dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, where], mask[i, where] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"] + [
    pytest.param(f, marks=pytest.mark.slow) for f in ("mistral", "qwen3", "olmo2", "gemma3_text")])
def test_reward_scores_match_transformers(tmp_path, family):
    hf = hf_reward_model(tmp_path, family)
    rng = np.random.default_rng(0)
    seqs = [list(map(int, rng.integers(3, 97, n))) for n in (5, 11, 3, 8, 13, 9)]
    ours = reward.from_pretrained(str(tmp_path), mesh=mesh())
    for side in ("right", "left"):
        ids, mask = hf_padded(seqs, side)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
        got = reward.score_ids(ours, seqs, batch_size=4, mesh=mesh(), pad_side=side)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.ptp(ref) > 0.1  # scores that differ, so a wrong row or token would show


def test_reward_score_read_at_last_non_pad_token(tmp_path):
    """A trailing pad-id token is skipped, as transformers does, on both padding sides."""
    hf = hf_reward_model(tmp_path, "llama")
    seqs = [[5, 6, 7, 0], [9, 8, 7, 6, 5]]  # 0 is pad_token_id
    ours = reward.from_pretrained(str(tmp_path))
    with torch.no_grad():
        ref = [hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    for side in ("right", "left"):
        np.testing.assert_allclose(reward.score_ids(ours, seqs, batch_size=2, pad_side=side),
                                   ref, atol=1e-4)


def test_custom_code_reward_model_refused(tmp_path):
    config = dict(COMMON, model_type="llama", architectures=["LlamaForRewardModelWithGating"],
                  auto_map={"AutoModelForSequenceClassification": "modeling_custom.Gated"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="custom code.*Skywork"):
        reward.from_pretrained(str(tmp_path), where="ArmoRM")
    config.pop("auto_map")
    for architecture in ("LlamaForCausalLM", "Gemma3ForConditionalGeneration",
                         "Phi3ForSequenceClassification"):
        config["architectures"] = [architecture]
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match=architecture):
            reward.from_pretrained(str(tmp_path))


# --- Pairs -----------------------------------------------------------------------------------

def record(pid, responses, scores):
    return {"prompt_id": pid, "prompt": f"q{pid}", "responses": responses, "scores": scores,
            "messages": [{"role": "user", "content": f"q{pid}"}]}


def test_identical_and_tied_prompts_dropped_and_counted():
    records = [record("a", ["x", "y", "z"], [0.1, 0.9, -0.5]),
               record("b", ["same", "same", "same"], [0.3, 0.3, 0.3]),
               record("c", ["u", "v", "w"], [0.2, 0.2, 0.2]),
               record("d", ["p", "q"], [1.0, 0.0]),
               record("e", ["", "r"], [1.0, 0.0])]
    rows, dropped = pairs_lib.make_rows(records)
    assert dropped == {"all_identical": 1, "tied": 1, "empty_answer": 1}
    assert [r["prompt_id"] for r in rows] == ["a", "d"]
    a = rows[0]
    assert a["chosen"][-1] == {"role": "assistant", "content": "y"}
    assert a["rejected"][-1] == {"role": "assistant", "content": "z"}
    assert a["chosen"][:-1] == [{"role": "user", "content": "qa"}]
    assert a["all_generated_responses"] == ["x", "y", "z"] and a["all_rm_scores"] == [0.1, 0.9, -0.5]
    assert formats.detect_format(rows, "auto") == "ultrafeedback"
    assert formats.normalise(a, "ultrafeedback")["chosen"] == "y"
    train, test = pairs_lib.split(rows, 0.5, seed=0)
    assert len(train) == len(test) == 1
    rep = pairs_lib.report(records, rows, dropped, train, test, len)
    assert rep["prompts_in"] == 5 and rep["pairs"] == 2 and rep["dropped"]["tied"] == 1
    assert rep["scores"]["margin"]["mean"] == pytest.approx((1.4 + 1.0) / 2)


# --- The modes on the tiny model -------------------------------------------------------------

def tiny_reward_model(folder):
    """A random tiny Llama reward model with the tiny SFT model's tokenizer and chat template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets/tiny_sft"))
    torch.manual_seed(1)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_config(tmp_path, rm_path, prompts=12):
    c = tiny.get_config()
    c.dataset_mixer = {os.path.join(ROOT, "assets/tiny_prefs_onpolicy"): prompts}
    c.output_dir = str(tmp_path / "run")
    c.generation_num_samples = 3
    c.generation_seeds = (13, 21, 42)
    c.generation_temperature = 1.0
    c.generation_max_new_tokens = 8
    c.generation_per_device_batch_size = 2
    c.generation_shard_prompts = 4
    c.generation_test_fraction = 0.25
    c.reward_model_name_or_path = rm_path
    c.reward_per_device_batch_size = 2
    return c


def folder_contents(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.mark.slow
def test_interrupted_generation_resumes_to_the_same_files(tmp_path, monkeypatch):
    rm_path = tiny_reward_model(tmp_path / "rm")
    whole = tiny_config(tmp_path / "whole", rm_path)
    rep = cli.main(whole, "generate")
    assert rep["prompts_in"] == 12 and rep["pairs"] + sum(rep["dropped"].values()) == 12
    assert rep["pairs"] >= 6 and rep["test"] >= 1

    cut = tiny_config(tmp_path / "cut", rm_path)
    real, calls = generate_lib.sample_answers, []

    def stop_after_two_shards(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("preempted")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_lib, "sample_answers", stop_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        cli.main(cut, "generate")
    out = generate_lib.output_dir(cut)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == [
        "generations-00000.jsonl", "generations-00001.jsonl"]
    with open(os.path.join(out, "shards", "generations-00002.jsonl.tmp"), "w") as f:
        f.write('{"cut short')  # a shard whose write was interrupted
    monkeypatch.setattr(generate_lib, "sample_answers", real)
    cli.main(cut, "generate")
    assert folder_contents(out) == folder_contents(generate_lib.output_dir(whole))
    monkeypatch.setattr(generate_lib, "load_policy", None)  # all sampled: the policy stays unloaded
    os.remove(os.path.join(out, "train.jsonl"))
    cli.main(cut, "generate")
    assert folder_contents(out) == folder_contents(generate_lib.output_dir(whole))
    monkeypatch.undo()

    rows = data_rows.read_file(os.path.join(out, "train.jsonl"))
    assert all(len(r["all_generated_responses"]) == 3 for r in rows)
    assert all(r["score_chosen"] == max(r["all_rm_scores"]) > r["score_rejected"] ==
               min(r["all_rm_scores"]) for r in rows)

    armo = tmp_path / "armo"  # a custom-code reward model is refused before any sampling
    armo.mkdir()
    (armo / "config.json").write_text(json.dumps(dict(
        COMMON, model_type="llama", architectures=["LlamaForRewardModelWithGating"],
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.Gated"})))
    called = []
    monkeypatch.setattr(generate_lib, "load_policy", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit):
        cli.main(tiny_config(tmp_path / "armo_run", str(armo)), "generate")
    assert not called
    monkeypatch.undo()

    changed = tiny_config(tmp_path / "cut", rm_path)
    changed.generation_temperature = 0.5
    with pytest.raises(SystemExit):  # a UserError: shards of other settings are never mixed
        cli.main(changed, "generate")


def test_rm_eval_win_rate():
    summary = rm_eval.win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 4.0])
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    assert summary["win_rate"] == pytest.approx(0.625)
    lo, hi = summary["ci95"]
    assert lo < 0.625 < hi


@pytest.mark.slow
def test_generate_pairs_train_rm_eval_end_to_end(tmp_path):
    rm_path = tiny_reward_model(tmp_path / "rm")
    config = tiny_config(tmp_path, rm_path, prompts=48)
    config.generation_shard_prompts = 16
    config.generation_test_fraction = 0.2
    rep = cli.main(config, "generate")
    assert rep["pairs"] >= 24
    config.dataset_mixer = {generate_lib.output_dir(config): 1.0}
    config.max_steps = 6
    config.per_device_train_batch_size = 2
    config.per_device_eval_batch_size = 2
    config.eval_steps = config.save_steps = 6
    config.num_samples = 2
    final = cli.main(config, "train")
    assert np.isfinite(final["loss"])
    config.rm_eval_num_prompts = 8
    summary = cli.main(config, "rm_eval")
    assert summary["num_prompts"] == min(8, rep["test"])
    assert summary["wins"] + summary["ties"] + summary["losses"] == summary["num_prompts"]
    assert summary["policy"].startswith("checkpoint") and summary["baseline"] == "assets/tiny_sft"
    for name in ("rm_eval.json", "rm_eval_answers.jsonl", "rm_eval.png"):
        assert os.path.exists(os.path.join(config.output_dir, name))


@pytest.mark.slow
def test_reward_model_by_hub_name(tmp_path):
    """A standard reward model by Hub id is downloaded and used; a custom-code one is refused."""
    import subprocess
    import sys

    from hub_stand_in import HubStandIn

    stand_in = HubStandIn()
    try:
        stand_in.add_model("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
                           tiny_reward_model(tmp_path / "rm"))
        armo = tmp_path / "armo"
        armo.mkdir()
        (armo / "config.json").write_text(json.dumps(dict(
            COMMON, model_type="llama", architectures=["LlamaForRewardModelWithGating"],
            auto_map={"AutoModelForSequenceClassification": "modeling_custom.Gated"})))
        (armo / "model.safetensors").write_bytes(b"not read")
        stand_in.add_model("RLHFlow/ArmoRM-Llama3-8B-v0.1", str(armo))
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=stand_in.url, HF_HOME=str(tmp_path / "hf_home"),
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        common = ["--config=configs/tiny.py", f"--config.output_dir={tmp_path / 'run'}",
                  "--config.dataset_mixer={'assets/tiny_prefs_onpolicy': 8}",
                  "--config.generation_max_new_tokens=4", "--config.generation_shard_prompts=8"]
        run = lambda name: subprocess.run(
            [sys.executable, "run.py", *common, "--mode=generate",
             f"--config.reward_model_name_or_path={name}"], cwd=ROOT, env=env, timeout=600,
            capture_output=True, text=True)
        refused = run("RLHFlow/ArmoRM-Llama3-8B-v0.1")
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "needs custom code" in refused.stderr and "Skywork" in refused.stderr
        assert not os.path.exists(tmp_path / "run" / "onpolicy")  # refused before sampling
        done = run("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2")
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "on-policy pairs: 8 prompts in" in done.stdout
    finally:
        stand_in.close()
