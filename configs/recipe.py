"""Loads an alignment-handbook / original-SimPO YAML recipe on top of configs/base.py.

Run: python run.py --config=configs/recipe.py:path/to/recipe.yaml (or simply
python run.py --config=path/to/recipe.yaml, which run.py maps to this file).
"""

from simpo_jax.config import yaml_recipe


def get_config(path=None):
    if not path:
        raise ValueError("configs/recipe.py needs a YAML path: --config=configs/recipe.py:FILE.yaml")
    return yaml_recipe.get_config(path)
