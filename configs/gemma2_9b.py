"""SimPO on Gemma-2-9B-it.

Run: python run.py --config=configs/gemma2_9b.py
Source: ../shared/seeds hyperparameter guide, "Gemma 2 9B (creative)" (lr 1e-6, linear schedule,
warmup 0.1, 1 epoch) and the 8B-13B row (per-device batch 1 x accumulation 8, sft_weight 0.1 for
instruct models). beta 10 and gamma_beta_ratio 0.5 follow the original SimPO repository's
gemma-2-9b-it-simpo.yaml (recalled from memory, not verified; it also used lr 8e-7).
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
