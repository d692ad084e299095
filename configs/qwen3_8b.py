"""SimPO on Qwen3-8B (per-head q/k norm, head_dim 128).

Run: python run.py --config=configs/qwen3_8b.py
Source: no SimPO run on Qwen3 is published. From the SimPO training skill's Hyperparameters
guide (Orchestra Research, github.com/Orchestra-Research/AI-Research-SKILLs,
06-post-training/simpo), 8B-13B row, as configs/llama3_8b_instruct.py cites it: learning_rate
3e-7, per-device batch 1 x accumulation 8, sft_weight 0.1. Ours: beta 10 and gamma_beta_ratio 0.5
(the SimPO paper's v0.2 instruct settings, github.com/princeton-nlp/SimPO README table), the
cosine schedule with warmup 0.1, one epoch, max_length 2048 (prompt 1800) of those runs, and
off-policy HuggingFaceH4/ultrafeedback_binarized pairs, and the plan target.
Plan: --mode=plan on tpu-v5p-8 (AOT compile, full remat, fsdp 4): 7.6 params + 15.3 AdamW + 32.5
temporaries = 55.5 of 95 GiB per chip, fits (a v5e-8's 16 GiB chips do not).
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model ---
    c.model_name_or_path = "Qwen/Qwen3-8B"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 256  # 152k vocabulary

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
    c.learning_rate = 3e-7
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 1
    c.gradient_accumulation_steps = 8

    # --- Output ---
    c.output_dir = "outputs/qwen3-8b-simpo"
    c.eval_steps = 200
    c.save_steps = 200
    c.plan_target = "tpu-v5p-8"
    return c
