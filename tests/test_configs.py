"""Every file in configs/ loads the way run.py loads it, validates, and documents its command."""

import glob
import os

import pytest
from ml_collections import config_flags

from simpo_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py"))
RECIPES = {"mistral7b", "llama3_8b_instruct", "gemma2_9b", "deepseek_math_7b", "zephyr7b"}


def load(path):
    module = config_flags.config_flags._LoadConfigModule(os.path.basename(path), path)
    return module.get_config(), module.__doc__


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
