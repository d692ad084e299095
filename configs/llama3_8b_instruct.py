"""SimPO on Llama-3-8B-Instruct with the cleaned UltraFeedback preferences and a light SFT term.

Run: python run.py --config=configs/llama3_8b_instruct.py
Source: "Workflow 2: fine-tune an instruct model (Llama 3 8B)" of the SimPO training skill
(Orchestra Research, github.com/Orchestra-Research/AI-Research-SKILLs, 06-post-training/simpo):
argilla/ultrafeedback-binarized-preferences-cleaned, beta 2.5, gamma_beta_ratio 0.5, lr 5e-7,
sft_weight 0.1, per-device batch 2 x accumulation 4. The skill's Hyperparameters guide gives lr
3e-7 and batch 1 x 8 for 8B-13B models instead.
The SimPO paper's Llama3-Instruct run (github.com/princeton-nlp/SimPO,
training_configs/llama-3-8b-instruct-simpo.yaml and the README's table, checked at commit
1b3e8f3) used on-policy data, princeton-nlp/llama3-ultrafeedback, with beta 2.5,
gamma_beta_ratio 0.55, learning_rate 1e-6, cosine, warmup 0.1, max_length 2048 (prompt 1800),
per-device batch 2 x accumulation 16 on 4 GPUs (128); its v0.2 (llama-3-8b-instruct-simpo-v2.yaml,
princeton-nlp/llama3-ultrafeedback-armorm) beta 10, gamma_beta_ratio 0.3, learning_rate 1e-6.
Memory: as written (float32 masters and AdamW moments) this needs 80-95 GiB chips (tpu-v5p-8);
on a TPU v5e-8 add (planned by the TPU compiler at 12.03 of 16 GiB per chip, the same effective batch;
docs/memory_plans.md):
  --config.master_weights=bfloat16_kahan --config.optimizer_state_dtype=bfloat16
  --config.offload_optimizer_state=True --config.per_device_train_batch_size=1
  --config.gradient_accumulation_steps=8
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model ---
    c.model_name_or_path = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 256  # 128k vocabulary

    # --- Data: only a train split is published; no eval split ---
    c.dataset_mixer = {"argilla/ultrafeedback-binarized-preferences-cleaned": 1.0}
    c.dataset_splits = ("train",)
    c.max_length = 2048
    c.max_prompt_length = 1800
    c.preprocessing_num_workers = 12

    # --- SimPO ---
    c.beta = 2.5
    c.gamma_beta_ratio = 0.5
    c.loss_type = "sigmoid"
    c.sft_weight = 0.1  # instruct model: preserve instruction following

    # --- Optimizer and batch ---
    c.learning_rate = 5e-7
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 2
    c.gradient_accumulation_steps = 4

    # --- Output ---
    c.output_dir = "outputs/llama-3-8b-instruct-simpo"
    c.save_steps = 200
    return c
