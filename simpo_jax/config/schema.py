"""The run config's fields: type, default, allowed values or bounds and a one-line doc, by section.

Plain Python (no jax, flax or ml_collections), so run.py --help and the JSONL reader stay light.
A section is a frozen dataclass whose annotations are the field types; `option` puts the default,
the doc and the bounds beside each field. configs/base.py builds its ConfigDict from these, and
`python -m simpo_jax.config` lists them. The allowed values of choice fields are the StrEnums of
choices.py; the rules between fields are in rules.py.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from simpo_jax.config.choices import (Choice, RematPolicy, AttentionImplementation, MasterWeights,
                                      StateDtype, LoraQuantization, LoraTarget, DataFormat,
                                      AssistantHeaderIn, TruncationMode, LossType,
                                      LrSchedulerType, BatchLayout, ExportDtype,
                                      PlanGpuCompiler, RmEvalBaseline)


@dataclasses.dataclass(frozen=True)
class Bound:
    """A rule on one numeric value; `valid` completes "must be ..." in the error message."""

    holds: Callable[[Any], bool]
    valid: str


POSITIVE = Bound(lambda v: v > 0, "> 0")
NON_NEGATIVE = Bound(lambda v: v >= 0, ">= 0")
POSITIVE_OR_FILL = Bound(lambda v: v > 0 or v == -1, "a positive integer or -1 (fill)")
POSITIVE_OR_ENV = Bound(lambda v: v > 0 or v == -1, "> 0, or -1 (from the environment)")
NON_NEGATIVE_OR_ENV = Bound(lambda v: v >= -1, ">= 0, or -1 (from the environment)")


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bound:
    """low <= v <= high, either end open; written [low, high) etc. in the message."""
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Bound(lambda v: (low < v if low_open else low <= v) and (v < high if high_open else
                                                                     v <= high), text)


def option(default: Any, doc: str, *bounds: Bound, valid: str = "") -> Any:
    """A field's default, one-line doc and bounds; `valid` replaces the bounds' text in messages."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata={"doc": doc, "bounds": bounds,
                                                                   "valid": valid})
    return dataclasses.field(default=default, metadata={"doc": doc, "bounds": bounds,
                                                        "valid": valid})


def section(title: str):
    """Marks a frozen dataclass as a titled section of the run config."""
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.title = title
        return cls
    return wrap


@section("Model")
class Model:
    model_name_or_path: str = option("", "local Hugging Face folder or Hub repo id (downloaded "
                                         "into the HF cache)")
    model_init: dict = option({}, "config.json fields for a randomly initialised model")
    model_init_seed: int = option(0, "PRNG seed of that random initialisation")
    tokenizer_name_or_path: str = option("", '"" = model_name_or_path')
    revision: str = option("", 'Hub branch, tag or commit of model_name_or_path and tokenizer; '
                               '"" = main')
    trust_remote_code: bool = option(False, "never run code shipped with a checkpoint unless asked")
    bf16: bool = option(False, "bfloat16 compute over float32 master parameters")
    gradient_checkpointing: bool = option(False, "rematerialise each decoder block in the "
                                                 "backward pass")
    remat_policy: RematPolicy = option("full", "what gradient_checkpointing keeps")
    attention_implementation: AttentionImplementation = option(
        "auto", "auto = splash on TPU, cuDNN on GPU in bf16 without soft-cap, else XLA; "
        "splash / flash run interpreted on CPU (docs/kernels.md)")
    logits_chunk_size: int = option(0, "positions per LM-head chunk in the loss; 0 = all at once",
                                    NON_NEGATIVE)


@section("Memory modes (measured effects: docs/memory_plans.md)")
class MemoryModes:
    master_weights: MasterWeights = option(
        "float32", "float32 = 12 bytes/param with AdamW; bfloat16_stochastic = 2 bytes, "
        "stochastically rounded updates; bfloat16_kahan = 4 bytes, bf16 weights + compensation")
    optimizer_state_dtype: StateDtype = option("float32", "AdamW moments (bfloat16: "
                                                          "stochastically rounded)")
    offload_optimizer_state: bool = option(False, "AdamW moments in host memory (pinned_host), "
                                                  "brought to the device for the update")


@section('LoRA (README "LoRA"); lora_rank > 0 trains W + (alpha / rank) B A, the base frozen')
class Lora:
    lora_rank: int = option(0, "r of every adapter; 0 = full fine-tuning", NON_NEGATIVE,
                            valid="an integer >= 0 (0 = full fine-tuning)")
    lora_alpha: float = option(16.0, "adapters' output scale lora_alpha / lora_rank; usually "
                                     "2 x rank")
    lora_dropout: float = option(0.0, "only 0.0 is implemented")
    lora_base_quantization: LoraQuantization = option(
        "none", "the frozen base's target projections: none (compute dtype) | int8 (per-row "
        "absmax scales); lora_rank > 0 only")
    lora_target_modules: tuple[str, ...] = option(
        LoraTarget.values(), "Hugging Face module names inside a decoder layer; embeddings and "
        "the LM head never")


@section("Data")
class Data:
    dataset_mixer: dict = option({}, "{name_or_path: fraction <= 1 or row count}")
    dataset_splits: tuple[str, ...] = option(("train_prefs", "test_prefs"),
                                             "the split whose name holds 'train' trains, "
                                             "one holding 'test' evaluates")
    data_format: DataFormat = option("auto", "row format of every data set")
    chat_template: str = option("", '"" = the tokenizer\'s; "alignment_handbook"; or Jinja text '
                                    "or a .jinja file")
    assistant_header_in: AssistantHeaderIn = option(
        "prompt", "prompt (TRL) | completion (original SimPO scripts)")
    max_length: int = option(1024, "tokens, prompt + completion", POSITIVE)
    max_prompt_length: int = option(512, "tokens", POSITIVE)
    length_buckets: tuple[int, ...] = option(
        (), "padded batch lengths (static shapes), increasing; () = powers of 2 from 64, "
        "max_length")
    truncation_mode: TruncationMode = option("keep_end", "for over-long prompts")
    max_dropped_fraction: float = option(0.05, "stop if more rows than this are dropped as bad",
                                         within(0, 1))
    preprocessing_num_workers: int = option(1, "processes for tokenisation", POSITIVE)
    dataset_cache_dir: str = option("", '"" = datasets\' default cache')


@section("SimPO objective")
class Objective:
    beta: float = option(2.0, "reward scale (SimPO range 2-10)", POSITIVE)
    gamma_beta_ratio: float = option(0.5, "target margin gamma/beta (0-1)", NON_NEGATIVE)
    loss_type: LossType = option("sigmoid", "sigmoid | hinge")
    label_smoothing: float = option(0.0, "sigmoid only", within(0, 0.5, high_open=True))
    sft_weight: float = option(0.0, "weight of the chosen-completion NLL term", NON_NEGATIVE)


@section("Optimizer and schedule")
class Optimizer:
    learning_rate: float = option(5e-7, "peak learning rate", POSITIVE)
    lr_scheduler_type: LrSchedulerType = option("cosine", "transformers semantics")
    warmup_ratio: float = option(0.1, "fraction of total steps; used when warmup_steps == 0",
                                 NON_NEGATIVE, within(0, 1))
    warmup_steps: int = option(0, "optimizer steps; overrides warmup_ratio when > 0", NON_NEGATIVE)
    weight_decay: float = option(0.0, "AdamW decoupled decay; never applied to norms and biases",
                                 NON_NEGATIVE)
    adam_beta1: float = option(0.9, "AdamW first-moment decay", within(0, 1, high_open=True))
    adam_beta2: float = option(0.999, "AdamW second-moment decay", within(0, 1, high_open=True))
    adam_epsilon: float = option(1e-8, "AdamW denominator floor", POSITIVE)
    max_grad_norm: float = option(1.0, "global-norm clipping; 0 disables", NON_NEGATIVE)


@section("Batch and length of training (layouts: docs/throughput.md)")
class Batch:
    num_train_epochs: float = option(1.0, "used when max_steps < 0")
    max_steps: int = option(-1, "optimizer steps; overrides num_train_epochs when > 0")
    per_device_train_batch_size: int = option(2, "pairs per data-parallel device per micro-batch",
                                              POSITIVE)
    per_device_eval_batch_size: int = option(4, "pairs per data-parallel device", POSITIVE)
    gradient_accumulation_steps: int = option(4, "micro-batches per optimizer step", POSITIVE)
    batch_layout: BatchLayout = option(
        "shared_prompt", "shared_prompt = pairs packed in rows, each prompt encoded once (fastest, "
        "exact); packed = pairs packed in rows; padded = a pair per row (debugging, comparison)")
    pack_row_length: int = option(0, "tokens per packed row; 0 = 2 * max_length (every pair fits)",
                                  NON_NEGATIVE)
    pack_rows_per_device: int = option(0, "rows per device per micro-batch; 0 = about "
                                          "per_device_train_batch_size pairs", NON_NEGATIVE)
    pack_max_pairs_per_row: int = option(32, "pairs one packed row holds at most", POSITIVE)
    group_by_length: bool = option(False, "padded layout: sort each window of 64 global batches "
                                          "by length")


@section("Mesh: data x fsdp x tensor; -1 fills the remaining devices")
class Mesh:
    mesh_data: int = option(1, "pure data parallel", POSITIVE_OR_FILL)
    mesh_fsdp: int = option(-1, "data parallel, parameters and optimizer state sharded",
                            POSITIVE_OR_FILL)
    mesh_tensor: int = option(1, "Megatron-style tensor parallel", POSITIVE_OR_FILL)


@section("Output, logging, evaluation, checkpoints, export and the Hub")
class Output:
    output_dir: str = option("outputs/run", "checkpoints, metrics, the export")
    seed: int = option(42, "data order")
    logging_steps: int = option(10, "optimizer steps between metric rows", POSITIVE)
    report_to: tuple[str, ...] = option(("tensorboard",), "sinks besides metrics.jsonl: "
                                                          "tensorboard, wandb")
    eval_steps: int = option(100, "optimizer steps between evaluations (also one before step 1 "
                                  "and at the end)", POSITIVE)
    num_samples: int = option(4, "greedy sample generations from eval prompts at every "
                                 "evaluation", NON_NEGATIVE)
    sample_max_new_tokens: int = option(128, "tokens per sample", NON_NEGATIVE)
    save_steps: int = option(500, "optimizer steps between checkpoints", POSITIVE)
    save_total_limit: int = option(2, "checkpoints kept; <= 0 keeps all")
    resume_from: str = option("", 'a checkpoint step folder; "" = latest complete one in '
                                  "output_dir, if any")
    export_dtype: ExportDtype = option("bfloat16", "dtype of the final Hugging Face export")
    max_shard_size: str = option("5GB", "safetensors shard size of the export")
    export_dir: str = option("", 'where --mode=export writes; "" = output_dir')
    push_to_hub: bool = option(False, "upload the export (with a model card) to the Hub")
    hub_model_id: str = option("", 'e.g. "your-name/mistral-7b-simpo"')
    hub_private_repo: bool = option(False, "create the Hub repository private")
    hub_push_adapter_only: bool = option(False, "LoRA: push output_dir/adapter (PEFT) instead of "
                                                "the merged model")
    # issue 26: one run per output_dir, exit codes pipelines can trust
    overwrite_output_dir: bool = option(False, "start afresh: move an earlier run in output_dir "
                                               "aside (to <output_dir>.old-<time>); False resumes it")
    allow_partial_push: bool = option(False, "--mode=export: push a run that stopped before its "
                                             "last step")


@section("LR range test (--mode=lr_find): an exponential sweep around learning_rate")
class LrFind:
    lr_find_span: float = option(1e3, "the sweep runs from learning_rate / span to "
                                      "learning_rate * span", POSITIVE)
    lr_find_min: float = option(0.0, "first learning rate; 0 = learning_rate / lr_find_span",
                                NON_NEGATIVE)
    lr_find_max: float = option(0.0, "last learning rate; 0 = learning_rate * lr_find_span",
                                NON_NEGATIVE)
    lr_find_steps: int = option(200, "real SimPO steps in the sweep", POSITIVE)


@section("Ahead-of-time memory plan (--mode=plan)")
class Plan:
    plan_target: str = option(
        "tpu-v5e-8", "tpu-v5e-1 | tpu-v5e-8 | tpu-v5p-8 | tpu-v5p-32 | tpu-v5p-64 | tpu-v4-32 | "
        "tpu-v6e-8 (compiled); gpu-h100x8 | gpu-h100x1 | gpu-a100x1 (estimates)")
    plan_capacity_gib: float = option(0.0, "memory per device to plan against; 0 = the target's "
                                           "own", NON_NEGATIVE)
    plan_search: bool = option(False, "try plan.SEARCH (memory modes, micro-batches, mesh) until "
                                      "one fits")
    plan_gpu_compiler: PlanGpuCompiler = option(
        "tpu", "GPU targets' estimate: tpu = the TPU compiler for v5p chips | cpu = simulated CPU "
        "devices next to an analytic count")


@section("On-policy data (--mode=generate) and reward-model judging (--mode=rm_eval)")
class Generation:
    generation_num_samples: int = option(5, "answers per prompt; one seed each", POSITIVE)
    generation_seeds: tuple[int, ...] = option((13, 21, 42, 79, 100),
                                               "the reference's seeds; as many as answers")
    generation_temperature: float = option(0.8, "0 = greedy", NON_NEGATIVE)
    generation_top_p: float = option(0.95, "nucleus mass kept (transformers' TopPLogitsWarper "
                                           "rule)", within(0, 1, low_open=True))
    generation_max_new_tokens: int = option(4096, "per answer; stops at EOS", POSITIVE)
    generation_per_device_batch_size: int = option(8, "sampled rows (prompt x seed) per "
                                                      "data-parallel device", POSITIVE)
    generation_shard_prompts: int = option(256, "prompts per output shard, the unit a rerun "
                                                "resumes from", POSITIVE)
    generation_output_dir: str = option("", '"" = <output_dir>/onpolicy')
    generation_test_fraction: float = option(0.05, "of the pairs, written to test.jsonl",
                                             within(0, 1, high_open=True))
    reward_model_name_or_path: str = option(
        "", 'a transformers *ForSequenceClassification folder or Hub id; "" = --mode=generate '
        "stops after sampling")
    reward_per_device_batch_size: int = option(8, "answers scored per data-parallel device per "
                                                  "batch", POSITIVE)
    rm_eval_baseline: RmEvalBaseline = option("model", "what the trained policy is judged "
                                                       "against")
    rm_eval_num_prompts: int = option(0, "held-out (test split) prompts judged; 0 = all",
                                      NON_NEGATIVE)


@section("Multi-process runs (GPU clusters; TPU pods use \"auto\")")
class MultiProcess:
    coordinator_address: str = option("", '"" = single process; "auto" = detect (TPU pods, '
                                          "SLURM); host:port")
    num_processes: int = option(-1, "-1 = from JAX_NUM_PROCESSES", POSITIVE_OR_ENV)
    process_id: int = option(-1, "-1 = from JAX_PROCESS_ID", NON_NEGATIVE_OR_ENV)


SECTIONS = (Model, MemoryModes, Lora, Data, Objective, Optimizer, Batch, Mesh, Output, LrFind,
            Plan, Generation, MultiProcess)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One field of the run config, as the schema declares it."""

    name: str
    section: str
    type: Any  # bool, int, float, str, a Choice, tuple[str, ...], tuple[int, ...] or dict
    default: Any
    doc: str
    bounds: tuple[Bound, ...]
    valid: str  # replaces the bounds' text in messages when set

    @property
    def choices(self) -> type[Choice] | None:
        return self.type if isinstance(self.type, type) and issubclass(self.type, Choice) else None


def _specs() -> dict[str, Spec]:
    out = {}
    for cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[f.name] = Spec(f.name, cls.title, hints[f.name], default, f.metadata["doc"],
                               f.metadata["bounds"], f.metadata["valid"])
    return out


FIELDS: dict[str, Spec] = _specs()
CHOICE_FIELDS = {name: spec.choices for name, spec in FIELDS.items() if spec.choices}
