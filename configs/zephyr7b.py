"""SimPO on Zephyr-7B-beta (a Mistral chat model) with UltraFeedback and a moderate SFT term.

Run: python run.py --config=configs/zephyr7b.py
Source: the Hyperparameters guide of the SimPO training skill (Orchestra Research,
github.com/Orchestra-Research/AI-Research-SKILLs, 06-post-training/simpo): the SFT-weight table's
chat-model row (HuggingFaceH4/zephyr-7b-beta, sft_weight 0.2) on top of the 7B standard recipe
(configs/mistral7b.py: lr 5e-7, beta 2.0, gamma_beta_ratio 0.5, batch 2 x 4, cosine, warmup 0.1).
Memory: as written (float32 masters and AdamW moments) this needs 80-95 GiB chips (tpu-v5p-8);
on a TPU v5e-8 add (planned by the TPU compiler at 11.93 of 16 GiB per chip, the same effective batch;
docs/memory_plans.md):
  --config.master_weights=bfloat16_kahan --config.optimizer_state_dtype=bfloat16
  --config.offload_optimizer_state=True --config.per_device_train_batch_size=1
  --config.gradient_accumulation_steps=8
"""

from configs import mistral7b


def get_config():
    c = mistral7b.get_config()

    # --- Model (mistral architecture, chat-tuned) ---
    c.model_name_or_path = "HuggingFaceH4/zephyr-7b-beta"

    # --- SimPO ---
    c.sft_weight = 0.2  # chat model: preserve conversational skills

    # --- Output ---
    c.output_dir = "outputs/zephyr-7b-simpo"
    return c
