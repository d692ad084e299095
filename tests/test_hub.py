"""The headline run for real: Hub models and data in (a local stand-in of the Hub), only the model out.

Each run is `python run.py --config=configs/<recipe>.py` in a subprocess, as a user types it, with
HF_ENDPOINT pointing at tests/hub_stand_in.py on 127.0.0.1 and only size overrides added. The
stand-in serves tiny random models under the recipes' real names, laid out like the real repos
(sharded safetensors next to PyTorch pickles; Gemma gated; Mistral base without a chat template).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "tiny_tokenizer")
PREFS = os.path.join(ROOT, "assets", "tiny_prefs")
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "README.md"}
SIZE = ["--config.max_steps=2", "--config.per_device_train_batch_size=1",
        "--config.per_device_eval_batch_size=4", "--config.gradient_accumulation_steps=1",
        "--config.max_length=64", "--config.max_prompt_length=48",
        "--config.preprocessing_num_workers=1", "--config.sample_max_new_tokens=4",
        "--config.num_samples=2", "--config.report_to=()"]


def tiny_hf_model(model_type: str, folder: str, *, chat_template: bool, shard: bool):
    """A random transformers model of `model_type` with the shipped tiny tokenizer, saved like a Hub repo."""
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=4096)
    else:
        config = transformers.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8,
                                           sliding_window=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    if not chat_template:  # like mistralai/Mistral-7B-v0.1: a base model's tokenizer has none
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    if not chat_template and os.path.exists(os.path.join(folder, "chat_template.jinja")):
        os.remove(os.path.join(folder, "chat_template.jinja"))
    # The real repos also hold PyTorch pickles; a run must never download them.
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a pickle anyone should load")


def ultrafeedback_files(folder: str, train_rows: int = 64, test_rows: int = 32) -> str:
    """The shipped tiny pairs laid out like HuggingFaceH4/ultrafeedback_binarized (parquet + card)."""
    import datasets

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for split, n in (("train_prefs", train_rows), ("test_prefs", test_rows)):
        ds = datasets.load_dataset("json", data_files=os.path.join(PREFS, f"{split}.jsonl"),
                                   split="train").select(range(n))
        ds.to_parquet(os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    card = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in ("train_prefs", "test_prefs"):
        card += [f"  - split: {split}", f"    path: data/{split}-*"]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(card + ["---", "", "# tiny stand-in of UltraFeedback binarized", ""]))
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from hub_stand_in import HubStandIn

    base = tmp_path_factory.mktemp("hub_repos")
    stand_in = HubStandIn()
    tiny_hf_model("mistral", str(base / "mistral"), chat_template=False, shard=True)
    stand_in.add_model("mistralai/Mistral-7B-v0.1", str(base / "mistral"))
    tiny_hf_model("gemma2", str(base / "gemma"), chat_template=True, shard=False)
    stand_in.add_model("google/gemma-2-9b-it", str(base / "gemma"), gated=True)
    pickles_only = base / "pickles"
    pickles_only.mkdir()
    shutil.copy(base / "mistral" / "config.json", pickles_only / "config.json")
    (pickles_only / "pytorch_model.bin").write_bytes(b"pickle")
    stand_in.add_model("someone/pickles-only", str(pickles_only))
    stand_in.add_dataset("HuggingFaceH4/ultrafeedback_binarized",
                         ultrafeedback_files(str(base / "ultrafeedback")))
    yield stand_in
    stand_in.close()


def run_py(args, hub_url, home, token=None, timeout=900):
    """`python run.py ARGS` as a user runs it, online against `hub_url`; (returncode, output, seconds)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = token
    start = time.time()
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


def uploaded_and_downloaded(stand_in):
    downloads = [p for m, p in stand_in.requests if m == "GET" and "/resolve/" in p]
    return set(stand_in.files), downloads


@pytest.mark.slow
@pytest.mark.parametrize("recipe, repo, token", [
    ("mistral7b", "mistralai/Mistral-7B-v0.1", False),
    ("gemma2_9b", "google/gemma-2-9b-it", True),
])
def test_recipe_runs_from_the_hub_and_pushes_only_the_model(hub, tmp_path, recipe, repo, token):
    import transformers

    out, home = tmp_path / "out", tmp_path / "hf_home"
    hub.files.clear()
    hub.requests.clear()
    code, log, _ = run_py([f"--config=configs/{recipe}.py", f"--config.output_dir={out}", *SIZE,
                           "--config.push_to_hub=True", f"--config.hub_model_id=someone/{recipe}"],
                          hub.url, home, token=hub.token if token else None)
    assert code == 0, log[-4000:]
    assert "PUBLIC" in log  # the start-up log says the upload will be public

    # Downloaded into the normal Hugging Face cache, without the pickles.
    snapshots = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    assert [f for s in snapshots.iterdir() for f in os.listdir(s) if f.endswith(".safetensors")]
    uploaded, downloads = uploaded_and_downloaded(hub)
    assert downloads and not [p for p in downloads if p.endswith(".bin")], downloads

    # The export loads in transformers and runs.
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == ("mistral" if recipe == "mistral7b" else "gemma2")
    assert (model(**transformers.AutoTokenizer.from_pretrained(out)("hello", return_tensors="pt"))
            .logits.isfinite().all())

    # Only the model went up: no checkpoints, logs, plots, samples or data reports.
    weights = {f for f in uploaded if f.endswith(".safetensors") or f.endswith(".index.json")}
    assert weights and uploaded - weights <= MODEL_FILES, uploaded
    assert {"config.json", "README.md", "tokenizer.json"} <= uploaded
    assert sorted(os.listdir(out / "checkpoints"))  # they exist locally, and stayed local
    assert hub.repos[-1] == (f"someone/{recipe}", False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, use_token, endpoint, expected", [
    (["--config.model_name_or_path=mistralai/Mistral-7B-v0.l"], False, None,
     "no such model repo"),
    pytest.param(["--config=configs/gemma2_9b.py"], False, None,
                 "is gated and no Hugging Face token", marks=pytest.mark.slow),
    pytest.param([], False, "closed", "cannot be reached", marks=pytest.mark.slow),
    pytest.param(["--config.model_name_or_path=someone/pickles-only"], False, None,
                 "never loads pickles", marks=pytest.mark.slow),
    pytest.param(['--config.dataset_mixer={"HuggingFaceH4/ultrafeedback_binarised": 1.0}'],
                 False, None, "no such data set", marks=pytest.mark.slow),
])
def test_model_errors_are_one_line_and_early(hub, tmp_path, args, use_token, endpoint, expected):
    url = f"http://127.0.0.1:{closed_port()}" if endpoint == "closed" else hub.url
    config = [a for a in args if a.startswith("--config=")] or ["--config=configs/mistral7b.py"]
    code, log, seconds = run_py(config + [a for a in args if not a.startswith("--config=")]
                                + [f"--config.output_dir={tmp_path / 'out'}", *SIZE],
                                url, tmp_path / "hf_home", timeout=120)
    assert code == 2, log[-3000:]
    assert seconds < 30, seconds
    errors = [line for line in log.splitlines() if line.startswith("run.py: error:")]
    assert len(errors) == 1 and expected in errors[0], log[-3000:]
    assert "Traceback" not in log and "Tokenizing" not in log, log[-3000:]


DOWNLOAD_ON_TWO_PROCESSES = """
import sys, jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from simpo_jax.hub import download
print("PATH", download.resolve_pretrained("mistralai/Mistral-7B-v0.1"))
"""


@pytest.mark.slow
def test_two_processes_process_zero_downloads_first_same_commit(hub, tmp_path):
    """Two hosts (own caches): process 0 downloads, then process 1 fetches the commit it got."""
    hub.requests.clear()
    hub.download_delay = 0.3  # without the ordering, the two hosts' downloads would interleave
    port = closed_port()
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / f"host{i}"), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", DOWNLOAD_ON_TWO_PROCESSES, f"127.0.0.1:{port}", str(i)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    hub.download_delay = 0.0
    assert all(p.returncode == 0 for p in procs), outputs
    paths = [next(line.split()[1] for line in o.splitlines() if line.startswith("PATH"))
             for o in outputs]
    assert [os.path.dirname(os.path.dirname(os.path.dirname(p))) for p in paths] == [
        str(tmp_path / f"host{i}" / "hub") for i in range(2)]
    assert os.path.basename(paths[0]) == os.path.basename(paths[1])  # the same commit
    files = sorted(os.listdir(paths[0]))
    assert files == sorted(os.listdir(paths[1])) and "config.json" in files
    # Every file was fetched twice (one cache per host), process 1's only after process 0's.
    gets = [p.split("/resolve/")[1] for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert len(gets) == 2 * len(files) and sorted(gets[:len(files)]) == sorted(gets[len(files):])


# --- A bounded Hub: timeouts, retries on 5xx, one line; published names, never local paths --------

def export_folder(folder):
    """The smallest folder push() takes for a model export."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("# card")
    (folder / "metrics.jsonl").write_text("{}\n")  # not part of the export: never pushed
    return str(folder)


@pytest.fixture
def online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; only stand-ins on 127.0.0.1 are reachable."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)


def test_push_to_a_hub_that_never_answers_is_one_line_within_the_timeout(tmp_path, monkeypatch,
                                                                         online):
    from huggingface_hub import HfApi

    from silent_hub import SilentHub
    from simpo_jax.errors import HubError
    from simpo_jax.hub import publish

    folder = export_folder(tmp_path / "export")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    with SilentHub() as silent:
        monkeypatch.setattr(publish, "hub_api", lambda: HfApi(endpoint=silent.url, token="x"))
        start = time.time()
        with pytest.raises(HubError) as error:
            publish.push(folder, "someone/model")
        seconds = time.time() - start
        assert silent.connections  # it did connect: the wait was for an answer
    assert seconds < 5, seconds
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "no answer within 1 s" in message and f"local export in {folder} is kept" in message


def test_push_retries_5xx_with_backoff_then_fails_in_one_line(tmp_path, monkeypatch, online,
                                                              caplog):
    from huggingface_hub import HfApi

    from hub_stand_in import HubStandIn
    from simpo_jax.errors import HubError
    from simpo_jax.hub import client, publish

    folder = export_folder(tmp_path / "export")
    monkeypatch.setattr(client, "RETRY_WAIT_S", 0.01)
    caplog.set_level("WARNING", logger=client.__name__)

    def waits():
        return [r.args[2] for r in caplog.records if "retrying" in r.msg]

    with HubStandIn() as stand_in:
        monkeypatch.setattr(publish, "hub_api", lambda: HfApi(endpoint=stand_in.url, token="x"))
        stand_in.failures = [503, 502]
        publish.push(folder, "someone/model")
        assert set(stand_in.files) == {"config.json", "model.safetensors", "README.md"}
        assert waits() == [0.01, 0.02]  # doubled before each next try

        caplog.clear()
        stand_in.failures = [503] * (client.RETRIES + 1)
        with pytest.raises(HubError) as error:
            publish.push(folder, "someone/model")
    assert waits() == [0.01 * 2 ** i for i in range(client.RETRIES)] and not stand_in.failures
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "503" in message and "is kept" in message


def test_card_and_adapter_name_the_base_model_never_a_local_path(tmp_path):
    from configs import tiny
    from simpo_jax.hub import publish

    local = os.path.join(ROOT, "assets", "tiny_sft")
    snapshot = tmp_path / "hub" / "models--someone--base-7b" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for given, name, hub_id in [(local, "tiny_sft", ""), ("assets/tiny_sft", "tiny_sft", ""),
                                (str(snapshot), "someone/base-7b", "someone/base-7b"),
                                ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1",
                                 "mistralai/Mistral-7B-v0.1")]:
        assert publish.base_model_name(given) == name
        config = tiny.get_config()
        config.model_name_or_path = given
        card = publish.model_card(config, None)
        assert local not in card and str(tmp_path) not in card
        assert f"Aligned from **{name}**" in card
        assert (f"base_model: {hub_id}" in card) == bool(hub_id) and card.count("base_model") <= 1


@pytest.mark.slow
def test_run_pushing_to_a_hub_that_never_answers_ends_in_one_line(tmp_path, monkeypatch):
    """A LoRA run from a local base given by its absolute path: the export names the base by its
    folder's name, and the push to a silent Hub is one line, not a hang."""
    from silent_hub import SilentHub

    local = os.path.join(ROOT, "assets", "tiny_sft")
    out = tmp_path / "out"
    args = ["--config=configs/tiny.py", f"--config.model_name_or_path={local}",
            f"--config.output_dir={out}", "--config.lora_rank=4", "--config.max_steps=2",
            "--config.eval_steps=1000", "--config.num_samples=0", "--config.report_to=()",
            "--config.push_to_hub=True", "--config.hub_model_id=someone/tiny-lora"]
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "3")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as a user has: quicker on 2 cores
    with SilentHub() as silent:
        code, log, _ = run_py(args, silent.url, tmp_path / "hf_home", timeout=600)
    assert code == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("run.py: error:")]
    assert len(errors) == 1 and "no answer within 3 s" in errors[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    card = (out / "README.md").read_text()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert local not in card and "Aligned from **tiny_sft**" in card
    assert adapter["base_model_name_or_path"] == "tiny_sft"
