"""Every default of simpo_jax, in one place. Recipes import this and override what they change.

The fields come from the schema (simpo_jax/config/schema.py), where each one's type, default,
allowed values or bounds and doc stand together; `python -m simpo_jax.config` lists them by
section. Field names follow the SimPO / alignment-handbook recipes, so the hyperparameter guides of
the SimPO repository (princeton-nlp/SimPO) and of the SimPO training skill apply by name.

Run: python run.py --config=configs/base.py --config.model_name_or_path=/path/to/hf_model
"""

import ml_collections

from simpo_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    return config_lib.defaults()
