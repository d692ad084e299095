"""Health of a run, not just of a step: the signs that stop it and the last healthy checkpoint.

Signs, in a step's metrics or an eval's: a value that is not finite (NaN/Inf); a collapse, seen as
gradient norm, reward accuracy and margins all exactly 0, or chosen and rejected log-probabilities
both at -ln V (a uniform distribution over the vocabulary: the model says nothing); a blow-up,
chosen log-probabilities far below even the uniform distribution's. A non-finite value, a sign in
an eval or a parameter that is not finite stops the run at once; the other signs after PATIENCE
consecutive steps.

A train step's metrics are computed from the state before its update, so step t's healthy metrics
vouch for the state saved at step t - 1, and an eval at step s for the state of step s. A checkpoint
is saved only while no sign is showing; once vouched for it becomes the Checkpointer's
`healthy_step`, which rotation never deletes. When the run stops, the checkpoints of the states the
signs condemn are renamed <step>.unhealthy and the message names the last healthy one.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from simpo_jax.errors import RunUnhealthy

log = logging.getLogger(__name__)

PATIENCE = 5  # consecutive steps showing a collapse or blow-up sign before the run stops
UNIFORM_TOLERANCE = 1e-3  # |logps + ln V| below this fraction of ln V reads as uniform
BLOWUP = 10.0  # chosen log-probabilities below BLOWUP x (-ln V) per token: a blown-up model


def signs(metrics: dict, log_vocab: float | None, *, train: bool = True,
          uniform: bool = True) -> list[str]:
    """The health signs in one row of metrics (floats), each as a few words; [] when healthy.
    `uniform`: whether log-probabilities at -ln V count (not for a run that started there)."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        return [", ".join(f"{k}={v}" for k, v in bad.items()) + " not finite"]
    out = []
    if train and all(metrics.get(k) == 0 for k in ("grad_norm", "rewards/accuracies",
                                                   "rewards/margins")):
        out.append("gradient norm, reward accuracy and margins all 0")
    chosen = metrics.get("logps/chosen")
    if at_uniform(metrics, log_vocab):
        if uniform:
            out.append(f"log-probabilities at -ln V = {-log_vocab:.4g} (a uniform distribution over "
                       f"the {round(math.exp(log_vocab))} tokens)")
    elif log_vocab and chosen is not None and chosen < -BLOWUP * log_vocab:
        out.append(f"logps/chosen={chosen:.4g}, far below the uniform distribution's "
                   f"{-log_vocab:.4g}")
    return out


def at_uniform(metrics: dict, log_vocab: float | None) -> bool:
    """Whether chosen and rejected log-probabilities both sit at -ln V (a uniform distribution)."""
    chosen, rejected = metrics.get("logps/chosen"), metrics.get("logps/rejected")
    if not log_vocab or chosen is None or rejected is None:
        return False
    return max(abs(chosen + log_vocab), abs(rejected + log_vocab)) < UNIFORM_TOLERANCE * log_vocab


@functools.partial(jax.jit)
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def state_is_finite(state) -> bool:
    """Whether every float in the state (parameters, optimizer moments) is finite: one reduction."""
    return bool(_all_finite(state))


class Health:
    """Watches a run's metrics and saves; raises RunUnhealthy with the whole story when it stops."""

    def __init__(self, checkpointer, vocab: int | None, advice: str, start_step: int = 0,
                 patience: int = PATIENCE):
        self.checkpointer, self.advice, self.patience = checkpointer, advice, patience
        self.log_vocab = math.log(vocab) if vocab and vocab > 1 else None
        self.saved = [start_step] if start_step else []  # a restored step counts as healthy
        self.checkpointer.healthy_step = start_step or None
        self.since = None  # the first step of the signs showing now
        self._warned = None  # the `since` whose skipped saves were warned about
        self._uniform = None  # whether -ln V is a sign: set by the first metrics seen

    def _signs(self, step: int, metrics: dict, *, train: bool) -> list[str]:
        """signs(), where log-probabilities at -ln V count only when the run did not start there:
        a freshly initialised model (model_init) is uniform before it has learnt anything, and a
        collapse is a model that became uniform."""
        if self._uniform is None:
            self._uniform = not at_uniform(metrics, self.log_vocab)
            if not self._uniform:
                log.warning("Step %d: log-probabilities start at -ln V (a uniform distribution, as "
                            "a freshly initialised model has); a collapse to it is not watched "
                            "for in this run.", step)
        return signs(metrics, self.log_vocab, train=train, uniform=self._uniform)

    def observe(self, step: int, metrics: dict) -> None:
        """A train step's metrics (computed from the state of step - 1)."""
        found = self._signs(step, metrics, train=True)
        if not found:
            self.since = None
            self._vouch(step - 1)
            return
        self.since = step if self.since is None else self.since
        if "not finite" in found[0] or step - self.since + 1 >= self.patience:
            self.stop(step, found, bad_from=self.since - 1)

    def observe_eval(self, step: int, metrics: dict) -> None:
        """An eval's metrics (computed from the state of `step`): any sign stops the run."""
        found = self._signs(step, metrics, train=False)
        if found:
            self.stop(step, found, bad_from=step, where="the eval of ")
        self._vouch(step)

    def may_save(self, step: int, state) -> bool:
        """Whether the state of `step` may be checkpointed; stops the run when it is not finite."""
        if self.since is not None:
            if self._warned != self.since:
                log.warning("Not saving checkpoints while the metrics show signs of an unhealthy "
                            "run (since step %d; first skipped: step %d).", self.since, step)
                self._warned = self.since
            return False
        if not state_is_finite(state):
            self.stop(step, ["a parameter or optimizer value not finite"], bad_from=step,
                      where="the state after ")
        return True

    def saved_step(self, step: int) -> None:
        self.saved.append(step)

    def _vouch(self, step: int) -> None:
        vouched = [s for s in self.saved if s <= step]
        if vouched:
            self.checkpointer.healthy_step = vouched[-1]

    def stop(self, step: int, found: list[str], *, bad_from: int, where: str = "") -> None:
        """Sets aside the checkpoints of states >= bad_from; raises RunUnhealthy."""
        moved = self.checkpointer.set_aside_from(bad_from)
        kept = self.checkpointer.steps()
        since = "" if self.since in (None, step) or where else f" since step {self.since}"
        at = f"{where}step {step}" if where else f"Step {step}"
        lines = [f"{at}: {'; '.join(found)}{since}. "
                 "The run stopped (an unhealthy run: diverged or collapsed)."]
        if kept:
            lines.append(f"The last healthy checkpoint is {self.checkpointer.directory}/{kept[-1]} "
                         "(kept; a rerun resumes from it)"
                         + (f"; set aside: {', '.join(moved)}." if moved else "."))
        else:
            lines.append("No healthy checkpoint was saved before it"
                         + (f" (set aside: {', '.join(moved)})" if moved else "")
                         + "; a rerun starts from the configured model.")
        lines.append(self.advice[0].upper() + self.advice[1:] + ".")
        raise RunUnhealthy(" ".join(lines))
