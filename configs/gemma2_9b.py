"""SimPO on Gemma-2-9B-it.

Run: python run.py --config=configs/gemma2_9b.py
Source: the "Gemma 2 9B (creative)" example of the Hyperparameters guide in the SimPO training
skill (Orchestra Research, github.com/Orchestra-Research/AI-Research-SKILLs, 06-post-training/simpo:
lr 1e-6, linear schedule, warmup 0.1, 1 epoch) and its 8B-13B row (per-device batch 1 x
accumulation 8, sft_weight 0.1 for instruct models). beta 10 and gamma_beta_ratio 0.5 are the
SimPO paper's Gemma run (github.com/princeton-nlp/SimPO, training_configs/gemma-2-9b-it-simpo.yaml
and the README's table, checked at commit 1b3e8f3), which also used learning_rate 8e-7, a cosine
schedule, warmup 0.1, max_length 2048 (prompt 1800), princeton-nlp/gemma2-ultrafeedback-armorm
and per-device batch 2 x accumulation 16 on 4 GPUs (128).
Memory: as written (float32 masters and AdamW moments) this needs 80-95 GiB chips (tpu-v5p-8);
on a TPU v5e-8 add (planned by the TPU compiler at 13.85 of 16 GiB per chip, the same effective batch;
docs/memory_plans.md):
  --config.master_weights=bfloat16_kahan --config.optimizer_state_dtype=bfloat16
  --config.offload_optimizer_state=True --config.per_device_train_batch_size=1
  --config.gradient_accumulation_steps=8
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model ---
    c.model_name_or_path = "google/gemma-2-9b-it"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 128  # 256k vocabulary: never materialise full-sequence logits

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
    c.lr_scheduler_type = "linear"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 1
    c.gradient_accumulation_steps = 8

    # --- Output ---
    c.output_dir = "outputs/gemma-2-9b-it-simpo"
    c.eval_steps = 200
    c.save_steps = 200
    return c
