"""The embedded default: a 2-layer Llama learns a copy rule from the shipped data on CPU.

Run: python run.py --config=configs/tiny.py
Source: the walking-skeleton measurement (copy rule, 2-layer 64-wide Llama, lr 1e-3 with TRL).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()

    # --- Model: a tiny Llama created from scratch -----------------------------------------------
    c.model_init = ml_collections.ConfigDict(dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ))
    c.tokenizer_name_or_path = "assets/tiny_tokenizer"

    # --- Data ------------------------------------------------------------------------------------
    c.dataset_mixer = ml_collections.ConfigDict({"assets/tiny_prefs": 1.0}, allow_dotted_keys=True)
    c.max_length = 64
    c.max_prompt_length = 48
    c.length_buckets = (32, 64)  # the tiny pairs are 17-25 tokens

    # --- SimPO and optimizer ---------------------------------------------------------------------
    c.beta = 2.0
    c.gamma_beta_ratio = 0.5
    c.learning_rate = 1e-3
    c.warmup_ratio = 0.1
    c.max_steps = 300
    c.per_device_train_batch_size = 16
    c.per_device_eval_batch_size = 64
    c.gradient_accumulation_steps = 1

    # --- Output ----------------------------------------------------------------------------------
    c.output_dir = "outputs/tiny"
    c.logging_steps = 10
    c.eval_steps = 100
    c.save_steps = 100
    c.sample_max_new_tokens = 8
    c.export_dtype = "float32"
    return c
