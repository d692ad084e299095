"""SimPO on DeepSeek-Math-7B base with distilabel math preferences: the skill's reasoning recipe.

Run: python run.py --config=configs/deepseek_math_7b.py
Source: "Workflow 3: reasoning-heavy tasks (lower learning rate)" of the SimPO training skill
(Orchestra Research, github.com/Orchestra-Research/AI-Research-SKILLs, 06-post-training/simpo):
beta 5.0, gamma_beta_ratio 0.7, lr 3e-7, sft_weight 0, per-device batch 1 x accumulation 16; and
its Hyperparameters guide's math row (lr 3e-7, "careful optimization"). The SimPO repository
(github.com/princeton-nlp/SimPO) publishes no math recipe; its README recommends a smaller
learning rate (e.g. 5e-7) for reasoning-intensive domains such as math.
Memory: as written (float32 masters and AdamW moments) this needs 80-95 GiB chips (tpu-v5p-8);
on a TPU v5e-8 add (planned by the TPU compiler at 10.22 of 16 GiB per chip, the same effective batch;
docs/memory_plans.md):
  --config.master_weights=bfloat16_kahan --config.optimizer_state_dtype=bfloat16
  --config.offload_optimizer_state=True --config.per_device_train_batch_size=1
  --config.gradient_accumulation_steps=16
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model (llama architecture) ---
    c.model_name_or_path = "deepseek-ai/deepseek-math-7b-base"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 256

    # --- Data: instruction / chosen_response / rejected_response rows, train split only ---
    c.dataset_mixer = {"argilla/distilabel-math-preference-dpo": 1.0}
    c.dataset_splits = ("train",)
    c.data_format = "distilabel_math"
    c.max_length = 1024
    c.max_prompt_length = 512

    # --- SimPO ---
    c.beta = 5.0
    c.gamma_beta_ratio = 0.7
    c.loss_type = "sigmoid"
    c.sft_weight = 0.0

    # --- Optimizer and batch ---
    c.learning_rate = 3e-7
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 1
    c.gradient_accumulation_steps = 16

    # --- Output ---
    c.output_dir = "outputs/deepseek-math-7b-simpo"
    c.save_steps = 100
    return c
