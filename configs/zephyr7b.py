"""SimPO on Zephyr-7B-beta (a Mistral chat model) with UltraFeedback and a moderate SFT term.

Run: python run.py --config=configs/zephyr7b.py
Source: ../shared/seeds hyperparameter guide: the SFT-weight table's chat-model row
(HuggingFaceH4/zephyr-7b-beta, sft_weight 0.2) with the 7B standard settings (lr 5e-7, beta 2.0,
gamma_beta_ratio 0.5, per-device batch 2 x accumulation 4, cosine, warmup 0.1).
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model (mistral architecture) ---
    c.model_name_or_path = "HuggingFaceH4/zephyr-7b-beta"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 256

    # --- Data ---
    c.dataset_mixer = {"HuggingFaceH4/ultrafeedback_binarized": 1.0}
    c.dataset_splits = ("train_prefs", "test_prefs")
    c.max_length = 1024
    c.max_prompt_length = 512
    c.preprocessing_num_workers = 12

    # --- SimPO ---
    c.beta = 2.0
    c.gamma_beta_ratio = 0.5
    c.loss_type = "sigmoid"
    c.sft_weight = 0.2  # chat model: preserve conversational skills

    # --- Optimizer and batch ---
    c.learning_rate = 5e-7
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 2
    c.gradient_accumulation_steps = 4

    # --- Output ---
    c.output_dir = "outputs/zephyr-7b-simpo"
    c.eval_steps = 200
    c.save_steps = 200
    return c
