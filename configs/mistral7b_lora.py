"""SimPO with LoRA on Mistral-7B base and UltraFeedback: the 7B recipe of configs/mistral7b.py
with rank-16 adapters on every attention and MLP projection over a frozen bfloat16 base.

Run: python run.py --config=configs/mistral7b_lora.py
Source: configs/mistral7b.py (the SimPO skill's standard 7B recipe) for everything but LoRA; the
"Hyperparameter Tuning" guide (SFT, DPO, RLHF) for LoRA: rank 16 (the "standard choice", 1B-7B
complex tasks 16-32), alpha = 2 x rank, and a learning rate ~10x the full fine-tuning rate (the
guide's "Not Scaling LR for LoRA"): 10 x the SimPO guide's 7B row (3e-7 to 5e-7) is 3e-6 to
5e-6. Not yet run at this size here; the 10x rule was measured on the tiny default (README, LoRA).
Memory (--mode=plan, TPU compiler; docs/memory_plans.md): 9.39 of 16 GiB per chip on a TPU v5e-8
as written; on ONE 16 GiB v5e chip (Colab/Kaggle-sized) with an int8 frozen base, 11.11 GiB:
  --config.plan_target=tpu-v5e-1 --config.lora_base_quantization=int8
"""

from configs import mistral7b


def get_config():
    c = mistral7b.get_config()

    # --- LoRA ---
    c.lora_rank = 16
    c.lora_alpha = 32.0  # 2 x rank
    c.lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj")

    # --- Optimizer: 10x the full fine-tuning rate of configs/mistral7b.py ---
    c.learning_rate = 5e-6

    # --- Output ---
    c.output_dir = "outputs/mistral-7b-simpo-lora"
    return c
