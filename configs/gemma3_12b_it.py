"""SimPO on Gemma-3-12B-it (its language model; the vision tower is exported unchanged).

Run: python run.py --config=configs/gemma3_12b_it.py
Source: the SimPO paper's v0.2 instruct settings (github.com/princeton-nlp/SimPO, README table and
training_configs/gemma-2-9b-it-simpo.yaml, as configs/gemma2_9b.py cites them): beta 10,
gamma_beta_ratio 0.5, learning_rate 8e-7, cosine schedule, warmup 0.1, one epoch, max_length 2048
(prompt 1800), princeton-nlp/gemma2-ultrafeedback-armorm, a global batch of 128 pairs. No SimPO
run on Gemma 3 is published: applying the Gemma 2 settings to Gemma 3 is ours, and so are the
data (Gemma 2's on-policy pairs, off-policy for Gemma 3), sft_weight 0.1 (instruct model), the
per-device batch 1 x accumulation 16 and the plan target (12B with AdamW states needs more than
a v5e-8's 128 GiB).
Model: google/gemma-3-12b-it ships as Gemma3ForConditionalGeneration; we train the language
model (model_type gemma3, text_config) and export the vision tower and projector bit for bit.
Plan: --mode=plan on tpu-v5p-8 (AOT compile, full remat, fsdp 4): 11.0 params + 21.9 AdamW + 44.1
temporaries = 77.0 of 95 GiB per chip, fits.
"""

from configs import base


def get_config():
    c = base.get_config()

    # --- Model ---
    c.model_name_or_path = "google/gemma-3-12b-it"
    c.bf16 = True
    c.gradient_checkpointing = True
    c.logits_chunk_size = 128  # 262k vocabulary: never materialise full-sequence logits

    # --- Data ---
    c.dataset_mixer = {"princeton-nlp/gemma2-ultrafeedback-armorm": 1.0}
    c.dataset_splits = ("train", "test")
    c.max_length = 2048
    c.max_prompt_length = 1800
    c.preprocessing_num_workers = 12

    # --- SimPO ---
    c.beta = 10.0
    c.gamma_beta_ratio = 0.5
    c.loss_type = "sigmoid"
    c.sft_weight = 0.1

    # --- Optimizer and batch ---
    c.learning_rate = 8e-7
    c.lr_scheduler_type = "cosine"
    c.warmup_ratio = 0.1
    c.num_train_epochs = 1.0
    c.per_device_train_batch_size = 1
    c.gradient_accumulation_steps = 16

    # --- Output ---
    c.output_dir = "outputs/gemma-3-12b-it-simpo"
    c.eval_steps = 200
    c.save_steps = 200
    c.plan_target = "tpu-v5p-8"
    return c
