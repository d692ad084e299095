"""SimPO on Phi-4-mini-instruct (3.8B; partial rotary and longrope, fused projections split on
import and re-fused on export).

Run: python run.py --config=configs/phi4_mini.py
Source: no SimPO run on Phi-4-mini is published; every value here is ours, taken from the SimPO
paper's v0.2 instruct settings (github.com/princeton-nlp/SimPO, README table and
training_configs/llama-3-8b-instruct-simpo-v2.yaml / gemma-2-9b-it-simpo.yaml): beta 10,
gamma_beta_ratio 0.5 (Gemma's; Llama's is 0.3), learning_rate 1e-6, cosine schedule, warmup 0.1,
one epoch, max_length 2048 (prompt 1800), with off-policy HuggingFaceH4/ultrafeedback_binarized
pairs, sft_weight 0.1 (instruct model) and per-device batch 2 x accumulation 8.
At max_length 2048 every position stays below original_max_position_embeddings (4096): the
short longrope factors apply, as in transformers.
Plan: --mode=plan on tpu-v6e-8 (AOT compile, full remat, fsdp 8): 1.8 params + 3.6 AdamW + 14.9
temporaries = 20.3 of 32 GiB per chip, fits; on a v5e-8 even batch 1 x 16 needs 17.7 of 16 GiB.
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model ---
    c.model_name_or_path = "microsoft/Phi-4-mini-instruct"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 256  # 200k vocabulary

    # --- Data ---
    c.dataset_mixer = {"HuggingFaceH4/ultrafeedback_binarized": 1.0}
    c.dataset_splits = ("train_prefs", "test_prefs")
    c.max_length = 2048
    c.max_prompt_length = 1800
    c.preprocessing_num_workers = 12

    # --- SimPO ---
    c.beta = 10.0
    c.gamma_beta_ratio = 0.5
    c.loss_type = "sigmoid"
    c.sft_weight = 0.1

    # --- Optimizer and batch ---
    c.learning_rate = 1e-6
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 2
    c.gradient_accumulation_steps = 8

    # --- Output ---
    c.output_dir = "outputs/phi-4-mini-instruct-simpo"
    c.eval_steps = 200
    c.save_steps = 200
    c.plan_target = "tpu-v6e-8"
    return c
