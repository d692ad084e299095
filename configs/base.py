"""Every default of simpo_jax, in one place. Recipes import this and override what they change.

Field names follow the SimPO / alignment-handbook recipes, so the hyperparameter guides of the
SimPO repository (princeton-nlp/SimPO) and of the SimPO training skill apply by name.

Run: python run.py --config=configs/base.py --config.model_name_or_path=/path/to/hf_model
"""

import ml_collections

from simpo_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- Model ---------------------------------------------------------------------------------
    c.model_name_or_path = ""  # local Hugging Face folder or Hub repo id (downloaded into the HF cache)
    c.model_init = ml_collections.ConfigDict()  # config.json fields for a randomly initialised model
    c.model_init_seed = 0  # PRNG seed of that random initialisation
    c.tokenizer_name_or_path = ""  # "" = model_name_or_path
    c.revision = ""  # Hub branch, tag or commit of model_name_or_path and tokenizer; "" = main
    c.trust_remote_code = False  # never run code shipped with a checkpoint unless asked
    c.bf16 = False  # bfloat16 compute over float32 master parameters
    c.gradient_checkpointing = False  # rematerialise each decoder block in the backward pass
    c.remat_policy = "full"  # with gradient_checkpointing: full | dots | dots_saveable
    c.attention_implementation = "auto"  # auto (TPU splash, GPU bf16 cuDNN, else xla) | xla | cudnn | splash | flash
    c.logits_chunk_size = 0  # positions per LM-head chunk in the loss; 0 = all at once

    # --- Memory modes (measured effects: docs/memory_plans.md) --------------------------------
    # Master weights: float32 (12 bytes/param with AdamW) | bfloat16_stochastic (2 bytes,
    # stochastically rounded updates: unbiased, noisy per weight) | bfloat16_kahan (bf16 weights +
    # bf16 compensation: 4 bytes, updates kept to ~16 bits). Never plain bf16: it drops every
    # update under 1/512 of a weight, i.e. all of SimPO's (lr 3e-7 to 1e-6). Gradients and the
    # accumulation buffer follow the master dtype.
    c.master_weights = "float32"
    c.optimizer_state_dtype = "float32"  # AdamW moments: float32 | bfloat16 (stochastically rounded)
    # AdamW moments (and a Kahan compensation) in host memory (pinned_host), brought to the
    # device for the update: pays when the state is sharded over many chips, not on one device.
    c.offload_optimizer_state = False

    # --- LoRA (README "LoRA") -----------------------------------------------------------------
    # lora_rank > 0 trains W + (lora_alpha / lora_rank) B A on the target projections of every
    # decoder layer, B starting at zero (step 0 = the base model). The base is frozen, held in the
    # compute dtype, never in the optimizer state or the checkpoints (re-read from
    # model_name_or_path); the export is the merged model plus a PEFT adapter in
    # output_dir/adapter. LoRA learning rates are ~10x full fine-tuning rates.
    c.lora_rank = 0  # r of every adapter; 0 = full fine-tuning
    c.lora_alpha = 16.0  # adapters' output scale lora_alpha / lora_rank; usually 2 x rank
    c.lora_dropout = 0.0  # only 0.0 is implemented
    # The frozen base's target projections: none (compute dtype) | int8 (per-row absmax scales,
    # 1 byte per weight; the merged export is that int8 base + the adapters). lora_rank > 0 only.
    c.lora_base_quantization = "none"
    # Hugging Face module names inside a decoder layer; embeddings and the LM head never.
    c.lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj")

    # --- Data ----------------------------------------------------------------------------------
    # {name_or_path: fraction <= 1 or row count}. A reference typed dict-or-ConfigDict, so a recipe's
    # plain dict is kept as it is: a ConfigDict would reject the dots in "/data/prefs.v1/train.jsonl".
    c.dataset_mixer = ml_collections.FieldReference(ml_collections.ConfigDict(allow_dotted_keys=True),
                                                    field_type=config_lib.DATASET_MIXER_TYPES)
    c.dataset_splits = ("train_prefs", "test_prefs")
    c.data_format = "auto"  # auto | ultrafeedback | messages | distilabel_math | plain
    # "" = the tokenizer's own; "alignment_handbook" = the handbook's default template, which the
    # original SimPO scripts give base models that have none (Mistral-7B-v0.1); or a Jinja
    # template, inline or as a path to a .jinja file. The export carries the template trained with.
    c.chat_template = ""
    c.assistant_header_in = "prompt"  # prompt (TRL) | completion (original SimPO scripts)
    c.max_length = 1024  # tokens, prompt + completion
    c.max_prompt_length = 512  # tokens
    c.length_buckets = ()  # padded batch lengths (static shapes); () = powers of 2 from 64, max_length
    c.truncation_mode = "keep_end"  # keep_end | keep_start (for over-long prompts)
    c.max_dropped_fraction = 0.05  # stop if more rows than this are dropped as bad
    c.preprocessing_num_workers = 1  # processes for tokenisation
    c.dataset_cache_dir = ""  # "" = datasets' default cache

    # --- SimPO objective -----------------------------------------------------------------------
    c.beta = 2.0  # reward scale (SimPO range 2-10)
    c.gamma_beta_ratio = 0.5  # target margin gamma/beta (0-1)
    c.loss_type = "sigmoid"  # sigmoid | hinge
    c.label_smoothing = 0.0  # sigmoid only
    c.sft_weight = 0.0  # weight of the chosen-completion NLL term

    # --- Optimizer and schedule ----------------------------------------------------------------
    c.learning_rate = 5e-7  # peak learning rate
    c.lr_scheduler_type = "cosine"  # cosine | linear | constant_with_warmup (transformers semantics)
    c.warmup_ratio = 0.1  # fraction of total steps; used when warmup_steps == 0
    c.warmup_steps = 0  # optimizer steps; overrides warmup_ratio when > 0
    c.weight_decay = 0.0  # AdamW decoupled decay; never applied to norms and biases
    c.adam_beta1 = 0.9
    c.adam_beta2 = 0.999
    c.adam_epsilon = 1e-8
    c.max_grad_norm = 1.0  # global-norm clipping; 0 disables

    # --- Batch and length of training ----------------------------------------------------------
    c.num_train_epochs = 1.0  # used when max_steps < 0
    c.max_steps = -1  # optimizer steps; overrides num_train_epochs when > 0
    c.per_device_train_batch_size = 2  # pairs per data-parallel device per micro-batch
    c.per_device_eval_batch_size = 4  # pairs per data-parallel device
    c.gradient_accumulation_steps = 4  # micro-batches per optimizer step
    # Batch layout (docs/throughput.md): padded = one pair per row, padded to a length bucket;
    # packed = several pairs per fixed-length row, no padding compute; shared_prompt = packed with
    # [prompt | chosen | rejected] per pair, so each prompt is encoded once. Same loss, same result.
    c.batch_layout = "padded"  # padded | packed | shared_prompt
    c.pack_row_length = 0  # tokens per packed row; 0 = 2 * max_length (every pair fits)
    c.pack_rows_per_device = 0  # rows per device per micro-batch; 0 = about per_device_train_batch_size pairs
    c.pack_max_pairs_per_row = 32
    # padded layout: sort each window of 64 global batches by length, so a step holds pairs of
    # about one length, instead of the random order of TRL and the original SimPO trainer. Tiny
    # task, 3 seeds, 300 steps: on gave eval loss 0.253 vs 0.213 off, reward accuracy 0.993 vs
    # 0.999, copy rate 69-88% vs 88%, at the same speed. Packed layouts ignore it.
    c.group_by_length = False

    # --- Mesh: data x fsdp x tensor; -1 fills the remaining devices ----------------------------
    c.mesh_data = 1
    c.mesh_fsdp = -1
    c.mesh_tensor = 1

    # --- Output, logging, evaluation, checkpoints ----------------------------------------------
    c.output_dir = "outputs/run"
    c.seed = 42  # data order
    c.logging_steps = 10  # optimizer steps between metric rows
    c.report_to = ("tensorboard",)  # sinks besides metrics.jsonl: tensorboard, wandb
    c.eval_steps = 100  # optimizer steps between evaluations (also one before step 1 and at the end)
    c.num_samples = 4  # greedy sample generations from eval prompts at every evaluation
    c.sample_max_new_tokens = 128  # tokens per sample
    c.save_steps = 500  # optimizer steps between checkpoints
    c.save_total_limit = 2  # checkpoints kept
    c.resume_from = ""  # a checkpoint step folder; "" = latest complete one in output_dir, if any
    c.export_dtype = "bfloat16"  # dtype of the final Hugging Face export: bfloat16 | float32
    c.max_shard_size = "5GB"  # safetensors shard size of the export
    c.export_dir = ""  # where --mode=export writes; "" = output_dir
    c.push_to_hub = False  # upload the export (with a model card) to the Hugging Face Hub
    c.hub_model_id = ""  # e.g. "your-name/mistral-7b-simpo"
    c.hub_private_repo = False
    c.hub_push_adapter_only = False  # LoRA: push output_dir/adapter (PEFT) instead of the merged model

    # --- LR range test (--mode=lr_find) -----------------------------------------------------------
    # An exponential sweep around learning_rate; it stops early once the loss diverges.
    c.lr_find_span = 1e3  # the sweep runs from learning_rate / span to learning_rate * span
    c.lr_find_min = 0.0  # first learning rate; 0 = learning_rate / lr_find_span
    c.lr_find_max = 0.0  # last learning rate; 0 = learning_rate * lr_find_span
    c.lr_find_steps = 200  # real SimPO steps in the sweep

    # --- Ahead-of-time memory plan (--mode=plan) -------------------------------------------------
    # tpu-v5e-1 | tpu-v5e-8 | tpu-v5p-8 | tpu-v5p-32 | tpu-v5p-64 | tpu-v4-32 | tpu-v6e-8 (compiled);
    # gpu-h100x8 | gpu-h100x1 | gpu-a100x1 (estimates)
    c.plan_target = "tpu-v5e-8"
    c.plan_capacity_gib = 0.0  # memory per device to plan against; 0 = the target's own
    c.plan_search = False  # try plan.SEARCH (memory modes, micro-batches, mesh) until one fits
    # GPU targets' estimate: tpu = the TPU compiler for v5p chips (libtpu; bf16-native like a GPU,
    # reports real buffers) | cpu = simulated CPU devices (upcasts bf16: overstates temporaries)
    # next to an analytic count, the larger deciding
    c.plan_gpu_compiler = "tpu"

    # --- On-policy data (--mode=generate) and reward-model judging (--mode=rm_eval) ---------------
    # Sampling as princeton-nlp/SimPO on_policy_data_gen/decode.py: one answer per seed per prompt.
    c.generation_num_samples = 5  # answers per prompt; one seed each
    c.generation_seeds = (13, 21, 42, 79, 100)  # the reference's seeds; as many as answers
    c.generation_temperature = 0.8  # 0 = greedy
    c.generation_top_p = 0.95  # nucleus mass kept (transformers' TopPLogitsWarper rule)
    c.generation_max_new_tokens = 4096  # per answer (the reference's max_tokens); stops at EOS
    c.generation_per_device_batch_size = 8  # sampled rows (prompt x seed) per data-parallel device
    c.generation_shard_prompts = 256  # prompts per output shard, the unit a rerun resumes from
    c.generation_output_dir = ""  # "" = <output_dir>/onpolicy
    c.generation_test_fraction = 0.05  # of the pairs, written to test.jsonl
    # A transformers *ForSequenceClassification folder or Hub id (llama, mistral, qwen2, gemma2...);
    # "" = --mode=generate stops after sampling. Reward models needing custom code are refused.
    c.reward_model_name_or_path = ""
    c.reward_per_device_batch_size = 8  # answers scored per data-parallel device per batch
    c.rm_eval_baseline = "model"  # what the trained policy is judged against: model | chosen
    c.rm_eval_num_prompts = 0  # held-out (test split) prompts judged; 0 = all

    # --- Multi-process runs (GPU clusters; TPU pods use "auto") ----------------------------------
    c.coordinator_address = ""  # "" = single process; "auto" = detect (TPU pods, SLURM); host:port
    c.num_processes = -1  # -1 = from JAX_NUM_PROCESSES
    c.process_id = -1  # -1 = from JAX_PROCESS_ID
    return c
