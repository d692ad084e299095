"""The hyperparameter doctor: the seed guides' ranges and troubleshooting advice, applied to a run.

Sources (../shared/seeds): the SimPO hyperparameter guide (learning rate by model size, beta,
gamma/beta, sft_weight, effective batch), the SimPO loss-function notes (margins, log-prob
warning signs) and the SimPO skill's troubleshooting (divergence, forgetting, weak separation).
"""

from __future__ import annotations

import math

GUIDE = "seeds: SimPO hyperparameter guide"
# (lower bound of the model size in parameters, highest learning rate of that row, row name)
LR_BY_SIZE = ((60e9, 1e-7, "70B+"), (13e9, 3e-7, "13B-30B"), (7e9, 5e-7, "7B-8B"),
              (1e9, 1e-6, "1B-3B"))
# (lower bound of the model size, recommended effective batch range in pairs, row name)
BATCH_BY_SIZE = ((60e9, (32, 64), "70B"), (13e9, (64, 128), "13B"), (5e9, (128, 256), "7B"))

DIVERGENCE = ("lower learning_rate (e.g. 5e-7 -> 3e-7 for 7B models) and beta (e.g. 2.0 -> 1.0) "
              "(seeds: SimPO troubleshooting, 'loss diverges')")


def config_warnings(config, *, num_params: int | None, effective_batch: int) -> list[str]:
    """One line per setting outside the seed guides' ranges, naming the field, value and range."""
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
    if num_params and num_params >= 1e9:
        for bound, max_lr, row in LR_BY_SIZE:
            if num_params >= bound:
                if config.learning_rate > max_lr:
                    out.append(f"learning_rate={config.learning_rate:g} is above the guide's row for "
                               f"{row} models (at most {max_lr:g}; {num_params / 1e9:.1f}B "
                               f"parameters here): risk of divergence and forgetting ({GUIDE}).")
                break
        for bound, (lo, hi), row in BATCH_BY_SIZE:
            if num_params >= bound:
                if effective_batch < lo / 2 or effective_batch > hi * 2:
                    out.append(
                        f"effective batch {effective_batch} pairs (per_device_train_batch_size x "
                        f"data-parallel devices x gradient_accumulation_steps) is far from the "
                        f"guide's {lo}-{hi} for {row} models ({GUIDE}).")
                break
    return out


class Advisor:
    """Watches training metrics and gives each piece of troubleshooting advice once.

    Rising loss: the mean loss of the last `window` observations exceeds the previous window's by
    more than 10% (after warm-up of 2 windows). Margins (rewards/margins) below 0.5 or above 5,
    averaged over the last window after `min_observations`. Chosen and rejected log-probs both
    below -10, or both above 0, over the last window.
    """

    def __init__(self, window: int = 10, min_observations: int = 20):
        self.window, self.min_observations = window, min_observations
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
                    f"{2 * w} logged steps): {DIVERGENCE}.")
        if n < self.min_observations:
            return
        margin = self._mean("rewards/margins", last)
        if margin is not None and margin < 0.5:
            yield "low_margin", (
                f"step {step}: reward margins average {margin:.3g} (< 0.5): preferences are not "
                "being learned; increase beta (e.g. 2.0 -> 5.0) or gamma_beta_ratio (e.g. 0.5 -> "
                "0.8) (seeds: SimPO loss notes, 'low margin'; troubleshooting, 'poor preference "
                "separation').")
        if margin is not None and margin > 5.0:
            yield "high_margin", (
                f"step {step}: reward margins average {margin:.3g} (> 5): the model may be "
                "overfitting; reduce beta or learning_rate (seeds: SimPO loss notes, 'high "
                "margin').")
        chosen, rejected = self._mean("logps/chosen", last), self._mean("logps/rejected", last)
        if chosen is not None and rejected is not None:
            if chosen < -10 and rejected < -10:
                yield "logps_very_negative", (
                    f"step {step}: chosen and rejected log-probs are both below -10 ({chosen:.3g}, "
                    f"{rejected:.3g}): the model is not learning (typical: chosen -1 to -2, "
                    "rejected -2 to -4); check the data and chat template, then the learning rate "
                    "(seeds: SimPO loss notes, 'warning signs').")
            if chosen > 0 and rejected > 0:
                yield "logps_positive", (
                    f"step {step}: chosen and rejected log-probs are both above 0: numerical "
                    "instability (seeds: SimPO loss notes, 'warning signs').")

    def nan_message(self, step: int, metrics: dict) -> str:
        bad = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm")
                        if k in metrics and not math.isfinite(float(metrics[k])))
        return (f"Step {step}: {bad} is not finite. The run stopped without writing a checkpoint of "
                f"this state; the last good checkpoint is kept. {DIVERGENCE[0].upper()}"
                f"{DIVERGENCE[1:]}.")

    def state_dict(self) -> dict:
        return {"given": sorted(self.given)}

    def load_state_dict(self, state: dict) -> None:
        self.given = set(state.get("given", ()))
