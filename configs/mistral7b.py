"""SimPO on Mistral-7B base with UltraFeedback: the SimPO skill's standard 7B recipe.

Run: python run.py --config=configs/mistral7b.py
Source: the "Mistral 7B Base (Standard)" example of the Hyperparameters guide in the SimPO
training skill (Orchestra Research, github.com/Orchestra-Research/AI-Research-SKILLs,
06-post-training/simpo): lr 5e-7, beta 2.0, gamma_beta_ratio 0.5, per-device batch 2 x
accumulation 4, cosine, warmup 0.1, bf16, gradient checkpointing.
The SimPO paper's own Mistral-Base run differs (github.com/princeton-nlp/SimPO,
training_configs/mistral-7b-base-simpo.yaml and the README's hyperparameter table, checked at
commit 1b3e8f3): it starts from the SFT model alignment-handbook/zephyr-7b-sft-full, with beta
2.0, gamma_beta_ratio 0.8, learning_rate 3e-7, cosine, warmup 0.1, max_length 1024 (prompt 512),
per-device batch 2 x accumulation 16 on 4 GPUs (a total batch of 128).
Memory: as written (float32 masters and AdamW moments) this needs 80-95 GiB chips (tpu-v5p-8);
on a TPU v5e-8 add (planned by the TPU compiler at 12.19 of 16 GiB per chip, the same effective batch;
docs/memory_plans.md):
  --config.master_weights=bfloat16_kahan --config.optimizer_state_dtype=bfloat16
  --config.offload_optimizer_state=True --config.per_device_train_batch_size=1
  --config.gradient_accumulation_steps=8
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model ---
    c.model_name_or_path = "mistralai/Mistral-7B-v0.1"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 256

    # --- Data ---
    c.dataset_mixer = {"HuggingFaceH4/ultrafeedback_binarized": 1.0}
    c.dataset_splits = ("train_prefs", "test_prefs")
    c.chat_template = "alignment_handbook"  # the base model has none; as the SimPO scripts do
    c.max_length = 1024
    c.max_prompt_length = 512
    c.preprocessing_num_workers = 12

    # --- SimPO ---
    c.beta = 2.0
    c.gamma_beta_ratio = 0.5
    c.loss_type = "sigmoid"
    c.sft_weight = 0.0  # base model: pure preference optimisation

    # --- Optimizer and batch ---
    c.learning_rate = 5e-7
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 2
    c.gradient_accumulation_steps = 4

    # --- Output ---
    c.output_dir = "outputs/mistral-7b-simpo"
    c.eval_steps = 200
    c.save_steps = 200
    return c
