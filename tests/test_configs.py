"""Every file in configs/ loads the way run.py loads it, validates, and documents its command."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from ml_collections import config_flags

from simpo_jax import config as config_lib
from simpo_jax.data.pairs import DataConfig
from simpo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py"))
RECIPES = {"mistral7b", "llama3_8b_instruct", "gemma2_9b", "deepseek_math_7b", "zephyr7b",
           "gemma3_12b_it", "llama31_8b_instruct", "qwen3_8b", "phi4_mini"}


FIXTURE = os.path.join(ROOT, "tests", "fixtures", "llama-3-8b-instruct-simpo.yaml")


def load(path):
    module = config_flags.config_flags._LoadConfigModule(os.path.basename(path), path)
    if path.endswith("recipe.py"):  # the YAML recipe loader takes a file argument
        return module.get_config(FIXTURE), module.__doc__
    return module.get_config(), module.__doc__


def test_base_fields_and_defaults_are_unchanged():
    """configs/base.py's fields, value types and defaults: the recipes and guides rely on them."""
    import ml_collections

    from configs import base

    config = base.get_config()
    got = []
    for name, value in config.items(preserve_field_references=True):
        if isinstance(value, ml_collections.FieldReference):
            assert value.get_type() == (dict, ml_collections.ConfigDict), name
            value = value.get()
        kind = type(value).__name__
        if isinstance(value, ml_collections.ConfigDict):
            assert value.is_type_safe, name
            value = value.to_dict()
        got.append([name, kind, list(value) if isinstance(value, tuple) else value])
    with open(os.path.join(ROOT, "tests", "fixtures", "base_config_defaults.json")) as f:
        assert got == json.load(f)
    assert config.dataset_mixer.allow_dotted_keys  # dots in paths and Hub names


def test_all_recipes_exist():
    assert RECIPES <= {os.path.basename(p)[:-3] for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p))
def test_config_validates_and_documents_its_command(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, doc = load(path)
    name = os.path.basename(path)
    if name == "base.py":  # every default; a run adds a model and data
        config.model_name_or_path = "some/model"
        config.dataset_mixer = {"some/data": 1.0}
    config.lock()
    config_lib.validate(config)
    assert f"python run.py --config=configs/{name}" in doc
    if name[:-3] in RECIPES:
        assert "Source:" in doc and config.bf16 and config.gradient_checkpointing
        assert 1.0 <= config.beta <= 10.0 and 0.0 <= config.gamma_beta_ratio <= 1.0


def test_original_simpo_yaml_recipe_loads_unchanged():
    from simpo_jax.config import yaml_recipe

    config, notes = yaml_recipe.load_yaml_recipe(FIXTURE)
    assert config.beta == 10.0 and config.gamma_beta_ratio == 0.3
    assert config.learning_rate == 1e-6 and isinstance(config.learning_rate, float)
    assert config.num_train_epochs == 1.0 and config.dataset_splits == ("train", "test")
    assert dict(config.dataset_mixer) == {"princeton-nlp/llama3-ultrafeedback-armorm": 1.0}
    assert config.report_to == ("wandb",) and config.hub_model_id == "simpo-exps"
    joined = "\n".join(notes)
    for key in ("optim", "attn_implementation", "gradient_checkpointing_kwargs", "run_name",
                "evaluation_strategy", "torch_dtype"):
        assert key in joined, key


def test_unknown_recipe_keys_are_all_listed(tmp_path):
    from simpo_jax.config import yaml_recipe

    path = tmp_path / "bad.yaml"
    path.write_text("beta: 2.0\nlora_r: 16\nuse_peft: true\nlearning_rate: 5e-7\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['lora_r', 'use_peft'\]"):
        yaml_recipe.load_yaml_recipe(str(path))


def test_gamma_maps_to_ratio(tmp_path):
    from simpo_jax.config import yaml_recipe

    path = tmp_path / "gamma.yaml"
    path.write_text("beta: 2.5\ngamma: 1.25\n")
    config, notes = yaml_recipe.load_yaml_recipe(str(path))
    assert config.gamma_beta_ratio == 0.5 and any("gamma" in n for n in notes)


@pytest.mark.slow
def test_yaml_recipe_trains_a_tiny_model(tmp_path):
    import subprocess
    import sys

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny_tokenizer"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    recipe = open(FIXTURE).read()
    recipe = recipe.replace("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path / "model"))
    recipe = recipe.replace("princeton-nlp/llama3-ultrafeedback-armorm",
                            os.path.join(ROOT, "assets", "tiny_prefs"))
    recipe = recipe.replace("- train\n- test", "- train_prefs\n- test_prefs")
    recipe = recipe.replace("output_dir: outputs/llama-3-8b-instruct-simpo",
                            f"output_dir: {tmp_path / 'out'}")
    recipe = recipe.replace("max_length: 2048", "max_length: 64").replace(
        "max_prompt_length: 1800", "max_prompt_length: 48")
    recipe = recipe.replace("- wandb", "- tensorboard")
    (tmp_path / "recipe.yaml").write_text(recipe)
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "run.py", f"--config={tmp_path / 'recipe.yaml'}", "--config.max_steps=4",
         "--config.gradient_accumulation_steps=1", "--config.export_dtype=float32"], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optim: ignored" in proc.stdout
    assert "train step 4/4" in proc.stdout
    assert os.path.exists(tmp_path / "out" / "config.json")


# Keys users have: absolute paths with dots, dot-folders, Hub names with and without dots.
DOTTED = {"/data/prefs.v1/train.jsonl": 1.0, "~/.cache/prefs/train.jsonl": 0.25, "org/data.v2": 2000,
          "argilla/ultrafeedback-binarized-preferences-cleaned": 0.5,
          "HuggingFaceH4/ultrafeedback_binarized": 1.0}
PARSE = """import json, sys
from absl import flags
import run
from simpo_jax.data.pairs import DataConfig
run.parse_flags(sys.argv)
print(json.dumps(DataConfig.from_config(flags.FLAGS.config).dataset_mixer))
"""


def parse_like_run_py(*args):
    """run.py's own flag parsing of ARGS in a fresh interpreter; stdout is the DataConfig mixer."""
    return subprocess.run([sys.executable, "-c", PARSE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_dotted_mixer_keys_from_a_config_file(tmp_path):
    (tmp_path / "dotted.py").write_text(
        "from configs import tiny\n\n\ndef get_config():\n    c = tiny.get_config()\n"
        f"    c.dataset_mixer = {DOTTED!r}\n    return c\n")
    proc = parse_like_run_py(f"--config={tmp_path / 'dotted.py'}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [list(item) for item in DOTTED.items()]
    config, _ = load(str(tmp_path / "dotted.py"))
    config.lock()
    config_lib.validate(config)
    assert DataConfig.from_config(config).dataset_mixer == tuple(DOTTED.items())


def test_dotted_mixer_keys_from_the_command_line():
    proc = parse_like_run_py("--config=configs/tiny.py", f"--config.dataset_mixer={json.dumps(DOTTED)}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [list(item) for item in DOTTED.items()]


def test_dotted_mixer_keys_from_a_yaml_recipe(tmp_path):
    from simpo_jax.config import yaml_recipe

    path = tmp_path / "dotted.yaml"
    path.write_text("dataset_mixer:\n" + "".join(f"  {k}: {v}\n" for k, v in DOTTED.items()))
    config, _ = yaml_recipe.load_yaml_recipe(str(path))
    assert dict(DataConfig.from_config(config).dataset_mixer) == DOTTED


def test_readme_mixer_examples_parse():
    readme = open(os.path.join(ROOT, "README.md")).read()
    examples = re.findall(r"--config\.dataset_mixer='([^']+)'", readme)
    assert examples
    for example in examples:
        proc = parse_like_run_py("--config=configs/tiny.py", f"--config.dataset_mixer={example}")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [list(item) for item in json.loads(example).items()]


@pytest.mark.slow
@pytest.mark.parametrize("value", ['{"/data/prefs.v1/train.jsonl" 1.0}', '["/data/prefs.v1"]',
                                   "/data/prefs.v1"])
def test_malformed_mixer_is_one_line_with_a_valid_example(value):
    proc = parse_like_run_py("--config=configs/tiny.py", f"--config.dataset_mixer={value}")
    assert proc.returncode == 2 and not proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"run.py: error: --config.dataset_mixer={value}: not a dict literal")
    example = re.search(r"e\.g\. --config\.dataset_mixer='([^']+)'$", line).group(1)
    ok = parse_like_run_py("--config=configs/tiny.py", f"--config.dataset_mixer={example}")
    assert ok.returncode == 0, ok.stderr


def test_misspelt_field_is_still_rejected():
    proc = parse_like_run_py("--config=configs/tiny.py", "--config.learnig_rate=1")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip() == ("run.py: error: --config.learnig_rate: 'learnig_rate' is not a "
                                   "config field (did you mean 'learning_rate'?); configs/base.py "
                                   "lists the fields.")


@pytest.mark.parametrize("amount", [0, -1.0, 1.5, "1.0", True])
def test_bad_mixer_amount_names_the_entry(amount):
    config, _ = load(os.path.join(ROOT, "configs", "tiny.py"))
    config.dataset_mixer = {"/data/prefs.v1/train.jsonl": 1.0, "org/data.v2": amount}
    with pytest.raises(ValueError, match=re.escape(f"config.dataset_mixer['org/data.v2']={amount!r}:")):
        config_lib.validate(config)


# --- The schema: values, rules between fields, enums, the listing -------------------------------

def tiny_config(**overrides):
    config, _ = load(os.path.join(ROOT, "configs", "tiny.py"))
    for name, value in overrides.items():
        setattr(config, name, value)
    config.lock()
    return config


@pytest.mark.parametrize("field,value", [("gamma_beta_ratio", float("nan")),
                                         ("max_grad_norm", float("nan")),
                                         ("warmup_ratio", float("nan")),
                                         ("learning_rate", float("inf")),
                                         ("beta", float("-inf"))])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(UserError, match=re.escape(f"config.{field}={value!r}: must be a finite "
                                                  "number.")):
        config_lib.validate(tiny_config(**{field: value}))


@pytest.mark.parametrize("field,value,valid", [
    ("adam_beta1", 1.0, "in [0, 1)"), ("adam_beta1", -0.1, "in [0, 1)"),
    ("adam_beta2", 1.0, "in [0, 1)"), ("adam_epsilon", 0.0, "> 0"),
    ("max_dropped_fraction", 1.5, "in [0, 1]"), ("warmup_ratio", 1.5, "in [0, 1]"),
    ("warmup_ratio", -0.1, ">= 0"), ("label_smoothing", 0.5, "in [0, 0.5)"),
    ("generation_top_p", 0.0, "in (0, 1]"), ("generation_test_fraction", 1.0, "in [0, 1)"),
    ("mesh_data", 0, "a positive integer or -1 (fill)"), ("max_length", 0, "> 0"),
    ("lora_rank", -1, "an integer >= 0 (0 = full fine-tuning)"),
    ("lora_rank", True, "an integer >= 0 (0 = full fine-tuning)"),
    ("batch_layout", "pakced", "one of ('padded', 'packed', 'shared_prompt')"),
])
def test_values_out_of_bounds_name_the_field_and_what_is_valid(field, value, valid):
    with pytest.raises(UserError, match=re.escape(f"config.{field}={value!r}: must be {valid}.")):
        config_lib.validate(tiny_config(**{field: value}))


@pytest.mark.parametrize("overrides,message", [
    (dict(mesh_data=-1, mesh_fsdp=-1), "At most one of mesh_data/mesh_fsdp/mesh_tensor may be -1"),
    (dict(batch_layout="packed", pack_row_length=16), r"config.pack_row_length=16 .*set it >= 64"),
    (dict(batch_layout="shared_prompt", pack_row_length=63), r"pack_row_length=63 is shorter"),
    (dict(length_buckets=(64, 32)), r"config.length_buckets=\(64, 32\): give increasing"),
    (dict(length_buckets=(0, 64)), r"config.length_buckets=\(0, 64\): give increasing positive"),
    (dict(length_buckets=(32, 32, 64)), r"config.length_buckets=\(32, 32, 64\)"),
    (dict(length_buckets=(16, 32)), r"the last >= max_length=64"),
    (dict(report_to=("tensorboard", "mlflow")), r"unknown sink\(s\) \['mlflow'\]"),
])
def test_rules_between_fields(overrides, message):
    with pytest.raises(UserError, match=message):
        config_lib.validate(tiny_config(**overrides))


@pytest.mark.parametrize("overrides", [dict(length_buckets=(32, 64, 128)),
                                       dict(batch_layout="packed", pack_row_length=64),
                                       dict(batch_layout="padded", pack_row_length=16),
                                       dict(mesh_data=2, mesh_fsdp=-1, mesh_tensor=2)])
def test_rules_keep_what_works(overrides):
    config_lib.validate(tiny_config(**overrides))


def test_validated_config_holds_enums_that_read_as_their_strings():
    from simpo_jax.config import choices

    config = tiny_config(batch_layout="packed", master_weights="bfloat16_kahan")
    run = config_lib.validate(config)
    assert run.batch_layout is choices.BatchLayout.PACKED and run.batch_layout == "packed"
    assert run.master_weights is choices.MasterWeights.BFLOAT16_KAHAN and run.is_locked
    assert isinstance(config.batch_layout, str) and not isinstance(config.batch_layout,
                                                                   choices.Choice)
    # Dumps, messages and metrics read the same: JSON, str, repr and format give the string.
    assert run.to_json() == config.to_json() and repr(run.to_dict()) == repr(config.to_dict())
    assert (f"{run.batch_layout} {run.batch_layout!r}", json.dumps({"x": run.loss_type})) == (
        "packed 'packed'", '{"x": "sigmoid"}')
    assert config_lib.validate(run).batch_layout is choices.BatchLayout.PACKED


def test_choice_lists_live_in_the_schema():
    from simpo_jax import data, lora, precision, report
    from simpo_jax.config import choices
    from simpo_jax.data import formats, tokenize
    from simpo_jax.models import decoder, layers

    assert precision.MASTER_WEIGHTS == ("float32", "bfloat16_stochastic", "bfloat16_kahan")
    for owned, choice in [(precision.MASTER_WEIGHTS, choices.MasterWeights),
                          (precision.STATE_DTYPES, choices.StateDtype),
                          (lora.QUANTIZATIONS, choices.LoraQuantization),
                          (lora.TARGET_MODULES, choices.LoraTarget),
                          (formats.FORMATS, choices.DataFormat),
                          (decoder.REMAT_POLICIES[1:], choices.RematPolicy),
                          (layers.ATTENTION_IMPLS, choices.AttentionImplementation),
                          (data.LAYOUTS, choices.BatchLayout),
                          (report.SINKS, choices.ReportSink),
                          (tokenize.TRUNCATION_MODES, choices.TruncationMode),
                          (tokenize.ASSISTANT_HEADER_IN, choices.AssistantHeaderIn)]:
        assert owned == choice.values() and all(type(v) is str for v in owned)


def test_yaml_recipe_with_gamma_and_gamma_beta_ratio_is_refused(tmp_path):
    from simpo_jax.config import yaml_recipe

    path = tmp_path / "both.yaml"
    path.write_text("beta: 2.5\ngamma: 1.25\ngamma_beta_ratio: 0.3\n")
    with pytest.raises(ValueError, match=r"sets both gamma=1.25 and gamma_beta_ratio=0.3; keep one"):
        yaml_recipe.load_yaml_recipe(str(path))


def test_listing_shows_every_field_by_section():
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    fields = [line.split(":")[0].strip() for line in lines if line.startswith("  ")]
    assert fields == list(json.loads(config_lib.defaults().to_json()))  # configs/base.py order
    assert sum(line.startswith("--- ") for line in lines) == 13
    assert "  batch_layout: str = 'shared_prompt'  [padded | packed | shared_prompt]  " in proc.stdout
    assert "  adam_beta2: float = 0.999  [in [0, 1)]  " in proc.stdout


def run_py(*args):
    return subprocess.run([sys.executable, "run.py", "--config=configs/tiny.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,expected", [
    (["--config.hub_model_id=me/bad name!!"],
     "run.py: error: config.hub_model_id='me/bad name!!': not a Hub repo id (Repo id must use"),
    (["--config.mesh_data=3"], "run.py: error: mesh {'data': 3, 'fsdp': -1, 'tensor': 1}: 8 "
                               "devices are not divisible by the fixed axes (product 3)"),
    (["--config.batch_layout=packed", "--config.pack_row_length=16"],
     "run.py: error: config.pack_row_length=16 is shorter than max_length=64"),
    (["--config.length_buckets=(16, 32)"], "run.py: error: config.length_buckets=(16, 32): give "),
], ids=["hub_model_id", "mesh_size", "pack_row_length", "length_buckets"])
def test_config_mistakes_are_one_line_before_any_data(args, expected):
    # A data path that does not exist: the config's mistake is found before the data is looked at.
    proc = run_py(*args, '--config.dataset_mixer={"no/such/prefs.jsonl": 1.0}')
    assert proc.returncode == 2 and not proc.stdout, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(expected), line


def heavy_imports(*args):
    """run.py ARGS under -X importtime: the process, and the heavy modules it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "run.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")}
    return proc, sorted(m for m in modules if m.split(".")[0] in (
        "jax", "jaxlib", "flax", "transformers", "torch", "numpy", "optax"))


def test_help_imports_nothing_heavy():
    proc, heavy = heavy_imports("--help")
    assert "--config" in proc.stdout
    assert not heavy, heavy


def test_a_field_mistake_is_one_line_before_anything_heavy_loads():
    """The schema's checks need no jax: a bad value is answered at once (0.3 s, not 2)."""
    proc, heavy = heavy_imports("--config=configs/tiny.py", "--config.beta=-1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "run.py: error: config.beta=-1.0: must be > 0."
    assert not heavy, heavy
