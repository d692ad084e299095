"""The hyperparameter doctor: the SimPO guides' ranges and troubleshooting advice, applied to a run.

Sources: the SimPO training skill of Orchestra Research's AI-Research-SKILLs repository
(github.com/Orchestra-Research/AI-Research-SKILLs, 06-post-training/simpo): its "Hyperparameters"
guide (learning rate by model size, beta, gamma/beta, sft_weight, effective batch), its "Loss
Functions" guide's Debugging section (reward margins, log-prob warning signs) and the skill's
"Common issues" (loss divergence, forgetting, poor preference separation).
"""

from __future__ import annotations

import math

GUIDE = "SimPO Hyperparameters guide"
LOSS_GUIDE = "SimPO Loss Functions guide, Debugging"
ISSUES = "SimPO skill, Common issues"
TUNING = "Hyperparameter Tuning guide"  # for SFT, DPO and RLHF: LoRA learning rates, rank, alpha
LORA_LR_FACTOR = 10  # the tuning guide: LoRA rates are ~10x full fine-tuning rates

# The guide's rows by model size, in parameters. A row "7B-8B" covers models called 7B or 8B:
# a name rounds the count to whole billions, so a 7B-class model has 6.5e9-7.5e9 parameters
# (DeepSeek-Math-7B 6.9e9, Mistral-7B 7.2e9) and an 8B one 7.5e9-8.5e9 (Llama-3-8B 8.0e9).
# "70B+" starts at 65e9 (Llama-2-70B has 69.0e9). Sizes between rows (Gemma-2-9B, 9.2e9) and
# under 0.5e9 (the tiny test models) have no row, so no size-based advice. The effective batch
# table's 7B / 13B / 70B rows apply to the same bands (the guide's "7B Models (Mistral, Llama 3)").
# (row, lowest size, size below which the row ends, learning-rate range, effective batch range)
SIZE_ROWS = (
    ("1B-3B", 0.5e9, 3.5e9, (5e-7, 1e-6), None),
    ("7B-8B", 6.5e9, 8.5e9, (3e-7, 5e-7), (128, 256)),
    ("13B-30B", 12.5e9, 30.5e9, (1e-7, 3e-7), (64, 128)),
    ("70B+", 65e9, math.inf, (5e-8, 1e-7), (32, 64)),
)


# Under 0.5B parameters the guides have no row (the SimPO guide's smallest, 1B-3B, is 5e-7 to
# 1e-6). The highest rate measured to train this repository's tiny models (bench/tiny_lr_sweep.py:
# the SFT base learns at 1e-5 to 3e-3 and no longer at 1e-2; a random init is erratic above 1e-2).
SMALL_MODEL_SIZE = 0.5e9
SMALL_MODEL_MAX_LR = 3e-3


def size_row(num_params: float | None):
    """The guide's row (name, lowest, end, lr range, batch range) for a model size, or None."""
    for row in SIZE_ROWS:
        if num_params and row[1] <= num_params < row[2]:
            return row
    return None


def divergence_advice(learning_rate: float | None = None, beta: float | None = None,
                      num_params: float | None = None) -> str:
    """What to lower when the loss diverges, in this run's own numbers where they are known."""
    if learning_rate:
        lr = f"learning_rate (e.g. {learning_rate:g} -> {learning_rate / 2:g}"
        row = size_row(num_params)
        if row:
            lr += f"; the guide's row for {row[0]} models is {row[3][0]:g} to {row[3][1]:g}"
        lr += ")"
    else:
        lr = "learning_rate (e.g. halve it)"
    b = f"beta (e.g. {beta:g} -> {beta / 2:g})" if beta else "beta (e.g. 2.0 -> 1.0)"
    return f"lower {lr} and {b} ({ISSUES}, 'loss divergence')"


def config_warnings(config, *, num_params: int | None, effective_batch: int) -> list[str]:
    """One line per setting outside the guides' ranges, naming the field, value and range."""
    out = []
    if config.beta < 1.0:
        out.append(f"beta={config.beta} is DPO-like: SimPO's beta is 2-10 (standard 2.0-2.5), much "
                   f"higher than DPO's 0.01-0.1, because SimPO rewards are average log-probs "
                   f"({GUIDE}).")
    elif config.beta > 10.0:
        out.append(f"beta={config.beta} is above the guide's range 1-10: risk of overfitting and "
                   f"ignoring weak preferences ({GUIDE}).")
    if not 0.0 <= config.gamma_beta_ratio <= 1.0:
        out.append(f"gamma_beta_ratio={config.gamma_beta_ratio} is outside the guide's range 0-1 "
                   f"(standard 0.5) ({GUIDE}).")
    if config.loss_type == "hinge" and config.label_smoothing:
        out.append(f"label_smoothing={config.label_smoothing} has no effect with loss_type='hinge' "
                   f"({GUIDE}: no label smoothing for hinge).")
    if config.sft_weight > 0.2:
        out.append(f"sft_weight={config.sft_weight} is above 0.2: strong capability preservation "
                   f"but weaker preference alignment (guide: 0 base, 0.05-0.1 instruct, 0.1-0.2 "
                   f"chat models) ({GUIDE}).")
    rank = config.lora_rank
    if rank and config.lora_alpha != 2 * rank:
        out.append(f"lora_alpha={config.lora_alpha:g} with lora_rank={rank}: the standard is "
                   f"alpha = 2 x rank = {2 * rank} ({TUNING}, 'LoRA: Rank and Alpha').")
    out += small_model_warnings(config, num_params)
    row = size_row(num_params)
    if row:
        name, _, _, (min_lr, max_lr), batch = row
        # Rounded: 10 x 5e-7 is 5.000000000000001e-06 in floating point, above a rate of 5e-6.
        lora_lr = tuple(float(f"{LORA_LR_FACTOR * x:.6g}") for x in (min_lr, max_lr))
        if rank and config.learning_rate < lora_lr[0]:
            out.append(f"learning_rate={config.learning_rate:g} with lora_rank={rank} is a "
                       f"full-fine-tuning rate: LoRA rates are ~{LORA_LR_FACTOR}x higher, "
                       f"{lora_lr[0]:g} to {lora_lr[1]:g} for {name} models ({GUIDE} x "
                       f"{LORA_LR_FACTOR}, {TUNING}, 'Not Scaling LR for LoRA').")
        elif rank and config.learning_rate > lora_lr[1]:
            out.append(f"learning_rate={config.learning_rate:g} is above {LORA_LR_FACTOR}x the "
                       f"guide's row for {name} models, the LoRA range (at most {lora_lr[1]:g}): "
                       f"risk of divergence ({GUIDE} x {LORA_LR_FACTOR}, {TUNING}).")
        elif not rank and config.learning_rate > max_lr:
            out.append(f"learning_rate={config.learning_rate:g} is above the guide's row for "
                       f"{name} models (at most {max_lr:g}; {num_params / 1e9:.1f}B parameters here): "
                       f"risk of divergence and forgetting ({GUIDE}).")
            if config.learning_rate >= lora_lr[0]:
                out.append(f"learning_rate={config.learning_rate:g} is a LoRA rate (~"
                           f"{LORA_LR_FACTOR}x full fine-tuning's) but lora_rank=0 trains every "
                           f"weight: lower it to {min_lr:g}-{max_lr:g}, or set lora_rank "
                           f"({TUNING}).")
        if batch and (effective_batch < batch[0] / 2 or effective_batch > batch[1] * 2):
            out.append(
                f"effective batch {effective_batch} pairs (per_device_train_batch_size x "
                f"data-parallel devices x gradient_accumulation_steps) is far from the guide's "
                f"{batch[0]}-{batch[1]} for {name} models ({GUIDE}).")
    return out


def small_model_warnings(config, num_params: float | None) -> list[str]:
    """The learning-rate row for models under 0.5B parameters, which the guides do not cover."""
    if not num_params or num_params >= SMALL_MODEL_SIZE or config.learning_rate <= SMALL_MODEL_MAX_LR:
        return []
    return [f"learning_rate={config.learning_rate:g} for a model of {num_params / 1e6:.3g}M "
            f"parameters is above {SMALL_MODEL_MAX_LR:g}, the highest rate at which the tiny "
            "models of bench/tiny_lr_sweep.py still learn: risk of divergence or collapse. The "
            f"{GUIDE} has no row under 0.5B (its 1B-3B row is 5e-7 to 1e-6); --mode=lr_find "
            "measures a rate for this model."]


class Advisor:
    """Watches training metrics and gives each piece of troubleshooting advice once.

    Rising loss: the mean loss of the last `window` observations exceeds the previous window's by
    more than 10% (after warm-up of 2 windows). Margins (rewards/margins) below 0.5 or above 5,
    averaged over the last window after `min_observations`. Chosen and rejected log-probs both
    below -10, or both above 0, over the last window. The run's learning_rate, beta and model
    size, when given, put the divergence advice in this run's own numbers.
    """

    def __init__(self, window: int = 10, min_observations: int = 20, *,
                 learning_rate: float | None = None, beta: float | None = None,
                 num_params: float | None = None):
        self.window, self.min_observations = window, min_observations
        self.divergence = divergence_advice(learning_rate, beta, num_params)
        self.history: list[dict] = []
        self.given: set[str] = set()

    def observe(self, step: int, metrics: dict) -> list[str]:
        """New advice (never repeated) after one training metrics row."""
        self.history.append({k: float(v) for k, v in metrics.items()
                             if isinstance(v, (int, float))})
        return [self._give(key, text) for key, text in self._check(step) if key not in self.given]

    def _give(self, key, text):
        self.given.add(key)
        return text

    def _mean(self, key, rows):
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    def _check(self, step):
        n, w = len(self.history), self.window
        last = self.history[-w:]
        if n >= 3 * w:
            now, before = self._mean("loss", last), self._mean("loss", self.history[-2 * w:-w])
            if now is not None and before is not None and now > before * 1.1:
                yield "rising_loss", (
                    f"step {step}: the loss is rising ({before:.4g} -> {now:.4g} over the last "
                    f"{2 * w} logged steps): {self.divergence}.")
        if n < self.min_observations:
            return
        margin = self._mean("rewards/margins", last)
        if margin is not None and margin < 0.5:
            yield "low_margin", (
                f"step {step}: reward margins average {margin:.3g} (< 0.5): preferences are not "
                "being learned; increase beta (e.g. 2.0 -> 5.0) or gamma_beta_ratio (e.g. 0.5 -> "
                f"0.8) ({LOSS_GUIDE}, 'low margin'; {ISSUES}, 'poor preference separation').")
        if margin is not None and margin > 5.0:
            yield "high_margin", (
                f"step {step}: reward margins average {margin:.3g} (> 5): the model may be "
                f"overfitting; reduce beta or learning_rate ({LOSS_GUIDE}, 'high margin').")
        chosen, rejected = self._mean("logps/chosen", last), self._mean("logps/rejected", last)
        if chosen is not None and rejected is not None:
            if chosen < -10 and rejected < -10:
                yield "logps_very_negative", (
                    f"step {step}: chosen and rejected log-probs are both below -10 ({chosen:.3g}, "
                    f"{rejected:.3g}): the model is not learning (typical: chosen -1 to -2, "
                    "rejected -2 to -4); check the data and chat template, then the learning rate "
                    f"({LOSS_GUIDE}, 'warning signs').")
            if chosen > 0 and rejected > 0:
                yield "logps_positive", (
                    f"step {step}: chosen and rejected log-probs are both above 0: numerical "
                    f"instability ({LOSS_GUIDE}, 'warning signs').")

    def nan_message(self, step: int, metrics: dict) -> str:
        bad = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm")
                        if k in metrics and not math.isfinite(float(metrics[k])))
        return (f"Step {step}: {bad} is not finite. The run stopped without writing a checkpoint of "
                f"this state; the last good checkpoint is kept. {self.divergence[0].upper()}"
                f"{self.divergence[1:]}.")

    def state_dict(self) -> dict:
        return {"given": sorted(self.given)}

    def load_state_dict(self, state: dict) -> None:
        self.given = set(state.get("given", ()))
