"""run.py as a new user meets it: one-line errors before anything loads, a quiet start on machines
without TPUs, the truncation warning, the closing summary, and --mode=eval on a finished run."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from simpo_jax import cli
from simpo_jax import config as config_lib
from simpo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFS = os.path.join(ROOT, "assets", "tiny_prefs")
TPU_NOISE = ("E0000", "TPU", "libtpu", "InitGoogle")


def run_py(*args, env=None, timeout=300):
    """`python run.py ARGS` from the repository root: (returncode, stdout, stderr, seconds)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr, time.time() - start


def tiny(**overrides):
    from configs import tiny as tiny_config

    c = tiny_config.get_config()
    for k, v in overrides.items():
        setattr(c, k, v)
    c.lock()
    return c


# --- Config fields ---------------------------------------------------------------------------------

def test_unknown_fields_named_with_a_suggestion():
    c = tiny()
    c.unlock()
    c.learnig_rate = 0.1
    with pytest.raises(UserError) as e:
        config_lib.validate(c, "my_config.py")
    assert str(e.value) == ("my_config.py sets config.learnig_rate (did you mean 'learning_rate'?), "
                            "which is not a config field; configs/base.py lists the fields.")
    c.zzz = 1
    with pytest.raises(UserError, match=r"^config\.learnig_rate \(did you mean 'learning_rate'\?\) "
                                        r"and config\.zzz are not config fields;"):
        config_lib.check_fields(c)


def test_missing_field_named_and_free_form_fields_pass():
    c = tiny()
    c.unlock()
    del c["beta"]
    with pytest.raises(UserError, match="the config has no field beta: start a config file"):
        config_lib.check_fields(c)
    c = tiny(model_init={"model_type": "llama", "any_config_json_field": 1},
             dataset_mixer={"any/name.v2": 1.0})
    config_lib.check_fields(c)  # model_init and dataset_mixer hold free-form keys


def test_push_without_a_repo_id_fails_before_training():
    with pytest.raises(UserError, match=r"push_to_hub=True needs config\.hub_model_id"):
        config_lib.validate(tiny(push_to_hub=True))
    config_lib.validate(tiny(push_to_hub=True, hub_model_id="me/tiny-simpo"))


# --- One line, no traceback, before anything loads ------------------------------------------------

TYPO = """from configs import tiny


def get_config():
    c = tiny.get_config()
    c.learnig_rate = 1e-1
    return c
"""


@pytest.mark.parametrize("args, expected", [
    (["--config={typo}"], "run.py: error: {typo} sets config.learnig_rate (did you mean "
                          "'learning_rate'?), which is not a config field; configs/base.py lists "
                          "the fields."),
    (["--config.learning_rate=-0.1"], "run.py: error: config.learning_rate=-0.1: must be > 0."),
    (['--config.dataset_mixer={{"data/prefs.jsonl": 1.0}}'],
     "run.py: error: dataset_mixer entry 'data/prefs.jsonl': no such file or folder"),
    (["--mode=eval", "--config.output_dir={tmp}/outputs/tiyn"],
     "run.py: error: --mode=eval: no checkpoint in {tmp}/outputs/tiyn/checkpoints, and "
     "output_dir='{tmp}/outputs/tiyn' does not exist (did you mean '{tmp}/outputs/tiny'?). Train "
     "first"),
    (["--mode=export", "--config.output_dir={tmp}/outputs/tiny"],
     "run.py: error: --mode=export: no checkpoint in {tmp}/outputs/tiny/checkpoints. Train first"),
    (["--config.resume_from={tmp}/outputs/tiny/checkpoints/300"],
     "run.py: error: config.resume_from='{tmp}/outputs/tiny/checkpoints/300': no such checkpoint "
     "step folder; give one like outputs/tiny/checkpoints/<step>."),
    (["--mode=plot", "--config.output_dir={tmp}/outputs/tiny"],
     "run.py: error: --mode=plot: no metrics.jsonl in {tmp}/outputs/tiny; train first"),
], ids=["misspelt_field_in_file", "negative_lr", "missing_data", "eval_no_checkpoint",
        "export_no_checkpoint", "missing_resume_from", "plot_no_metrics"])
def test_user_errors_are_one_line_before_anything_loads(tmp_path, args, expected):
    (tmp_path / "typo.py").write_text(TYPO)
    (tmp_path / "outputs" / "tiny").mkdir(parents=True)
    fill = dict(typo=tmp_path / "typo.py", tmp=tmp_path)
    args = [a.format(**fill) for a in args]
    if not any(a.startswith("--config=") for a in args):
        args.insert(0, "--config=configs/tiny.py")
    code, out, err, seconds = run_py(*args)
    assert code == 2 and not out, (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith(expected.format(**fill)), line
    assert seconds < 30, seconds  # jax, the model and the data were never loaded


def test_user_error_raised_while_loading_is_one_line_and_bugs_keep_tracebacks(tmp_path, capsys,
                                                                              monkeypatch):
    from simpo_jax import train

    # Raised deep in the data pipeline, after the mesh and the tokenizer: still one line.
    (tmp_path / "prefs").mkdir()
    (tmp_path / "prefs" / "train_prefs.jsonl").write_text('{"prompt": "x"}\n' * 4)
    config = tiny(dataset_mixer={str(tmp_path / "prefs"): 1.0}, data_format="plain",
                  output_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit) as e:
        cli.main(config)
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("run.py: error: 100.0% of the 4 rows of the train split 'train_prefs' "
                           "were dropped (4), more than max_dropped_fraction=0.05.")

    def bug(config):
        raise KeyError("a bug")

    monkeypatch.setattr(train, "train", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(tiny(output_dir=str(tmp_path / "out")))


def test_commands_keep_the_users_arguments():
    argv = ["run.py", "--config=configs/tiny.py", '--config.dataset_mixer={"/d/p.v1": 1.0}',
            "--mode", "train", "--config.push_to_hub=False", "--config.hub_model_id", "me/x",
            "--config.max_steps=5"]
    assert cli.command(argv, "export", "--config.push_to_hub=True") == (
        "python run.py --config=configs/tiny.py '--config.dataset_mixer={\"/d/p.v1\": 1.0}' "
        "--config.max_steps=5 --mode=export --config.push_to_hub=True")
    assert shlex.split(cli.command(argv, "eval"))[2:] == [argv[1], argv[2], argv[-1], "--mode=eval"]
    assert cli.config_source(["run.py", "--config", "r.yaml"]) == "r.yaml"


# --- A short run as a user types it, then --mode=eval on it ---------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """run.py trains 2 steps on 64 shipped pairs with max_length=10, max_prompt_length=6, in a clean
    environment (no JAX_PLATFORMS; libtpu, when installed, free to start as jax's probe would)."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "prefs").mkdir()
    for split, n in (("train_prefs", 64), ("test_prefs", 16)):
        with open(os.path.join(PREFS, f"{split}.jsonl")) as f:
            (tmp / "prefs" / f"{split}.jsonl").write_text("".join(f.readlines()[:n]))
    overrides = dict(dataset_mixer={str(tmp / "prefs"): 1.0}, max_length=10, max_prompt_length=6,
                     max_steps=2, save_steps=1, per_device_train_batch_size=16,
                     per_device_eval_batch_size=16, num_samples=0, report_to=(),
                     output_dir=str(tmp / "out"))
    args = ["--config=configs/tiny.py"] + [
        f"--config.{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in overrides.items()]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = ""  # one CPU device, as a user has: quicker than conftest's 8 on 2 cores
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # another process's libtpu lock must not hide the noise
    code, out, err, _ = run_py(*args, env=env, timeout=600)
    assert code == 0, out[-3000:] + err[-3000:]
    # The same run on this process's 8 devices: 2 pairs each keeps the checkpoint's batch of 16.
    overrides.update(per_device_train_batch_size=2, per_device_eval_batch_size=2)
    return dict(args=args, out=out, err=err, overrides=overrides, dir=tmp / "out")


@pytest.mark.slow  # one shared tiny run via run.py (about 30 s)
def test_run_prints_no_tpu_noise(finished_run):
    noise = [line for line in (finished_run["out"] + finished_run["err"]).splitlines()
             if any(word in line for word in TPU_NOISE)]
    assert not noise, noise


@pytest.mark.slow  # one shared tiny run via run.py (about 30 s)
def test_truncation_is_shown_and_warned_about(finished_run):
    lines = finished_run["out"].splitlines()
    train_row = next(line for line in lines if line.startswith("train ")).split()
    assert train_row[:4] == ["train", "64", "64", "64"] and int(train_row[4]) > 0
    assert any(line.startswith("warning: 100.0% of the train pairs are truncated (64 prompts cut to "
                               "max_prompt_length=6 tokens") for line in lines), lines


@pytest.mark.slow  # one shared tiny run via run.py (about 30 s)
def test_closing_summary(finished_run):
    out, args = finished_run["out"], finished_run["args"]
    summary = out[out.index("Training finished at step 2."):].splitlines()
    metrics = json.loads((finished_run["dir"] / "eval_results.json").read_text())
    assert summary[1] == "Final eval (all in eval_results.json): " + ", ".join(
        f"{k} {metrics[k]:.4g}" for k in cli.SUMMARY_METRICS)
    folder = str(finished_run["dir"])
    assert summary[2] == (f"Hugging Face model folder: {folder} "
                          f"(transformers.AutoModelForCausalLM.from_pretrained({folder!r}) loads it)")
    assert summary[3] == "Evaluate it:        python " + shlex.join(["run.py", *args, "--mode=eval"])
    assert summary[4] == "Push it to the Hub: python " + shlex.join(
        ["run.py", *args, "--mode=export", "--config.push_to_hub=True",
         "--config.hub_model_id=your-name/out"])
    assert os.path.exists(os.path.join(folder, "config.json"))


def eval_rows(folder):
    with open(folder / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows if any(k.startswith("eval_") for k in r)]


@pytest.mark.slow  # one shared tiny run via run.py (about 30 s)
def test_eval_on_a_finished_run_adds_no_duplicate_row(finished_run, capsys):
    folder = finished_run["dir"]
    assert eval_rows(folder) == [0, 2]
    os.remove(folder / "eval_results.json")
    metrics = cli.main(tiny(**finished_run["overrides"]), "eval")
    assert eval_rows(folder) == [0, 2]
    assert json.loads((folder / "eval_results.json").read_text()) == metrics
    assert "metrics.jsonl already holds this step's eval row" in capsys.readouterr().out
    # An older checkpoint without an eval row gets one; eval_results.json stays the latest's.
    cli.main(tiny(**finished_run["overrides"], resume_from=str(folder / "checkpoints" / "1")), "eval")
    assert eval_rows(folder) == [0, 2, 1]
    assert json.loads((folder / "eval_results.json").read_text()) == metrics


def test_no_unretrieved_future_is_logged_after_the_one_line(tmp_path, monkeypatch, caplog):
    """Orbax writes in flight when the disk filled end as futures no one awaits: once the one
    line is out, asyncio must not log each one's traceback as they are collected on the way out
    (seen after a full disk: 'Future exception was never retrieved' and a traceback)."""
    import asyncio
    import gc
    import logging
    import types

    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "level", asyncio_log.level)  # restored afterwards
    config = types.SimpleNamespace(output_dir=str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        cli.fail(config, OSError(28, "No space left on device"), cli.EXIT_DISK, "no space left")
    assert exit_.value.code == cli.EXIT_DISK
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError("RESOURCE_EXHAUSTED: Failed writing"))
    del future
    gc.collect()
    loop.close()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
