"""Train state and the pure SimPO train/eval steps, jitted once with explicit shardings.

Batch (from simpo_jax.data), B pairs, T tokens:
  input_ids [B, 2, T] int32 (0 = prompt+chosen, 1 = prompt+rejected, right-padded),
  completion_start [B, 2], lengths [B, 2] int32 (scored tokens are [start, length)),
  pair_mask [B] float32 (0 for padding pairs).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_jax import loss as loss_lib
from simpo_jax import sharding as sharding_lib

BATCH_KEYS = ("input_ids", "completion_start", "lengths", "pair_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates done
    params: Any  # nnx.State of the model's nnx.Param leaves (float32 master copy)
    opt_state: Any


def pair_forward(graphdef, params, batch, cfg: loss_lib.LossConfig, logits_chunk_size: int = 0):
    """Chosen and rejected of every pair in one forward pass: per-pair sums and the objective parts.

    logits_chunk_size > 0 applies the LM head that many positions at a time (never materialising
    full-sequence logits); 0 computes all logits at once.
    """
    model = nnx.merge(graphdef, params)
    ids = batch["input_ids"]
    b, two, t = ids.shape
    flat_ids = ids.reshape(b * two, t)
    starts, lengths = batch["completion_start"].reshape(-1), batch["lengths"].reshape(-1)
    mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    if logits_chunk_size:
        hidden = model.hidden_states(flat_ids, mask)
        logps, counts, mean_logits = loss_lib.sequence_stats_chunked(
            hidden, model.logits_from_hidden, flat_ids, starts, lengths, logits_chunk_size)
    else:
        logits = model(flat_ids, mask)
        logps, counts, mean_logits = loss_lib.sequence_stats(logits, flat_ids, starts, lengths)
    logps, counts, mean_logits = (x.reshape(b, two) for x in (logps, counts, mean_logits))
    token_sums = logps * counts
    return loss_lib.pair_metric_sums(logps, counts, mean_logits, batch["pair_mask"], token_sums, cfg)


def _denominators(batch):
    """Valid pairs and chosen tokens of the whole (global) batch, known before the forward pass."""
    counts = jnp.maximum(batch["lengths"] - batch["completion_start"], 0).astype(jnp.float32)
    valid = batch["pair_mask"] * (counts[:, 0] > 0) * (counts[:, 1] > 0)
    return jnp.maximum(valid.sum(), 1.0), jnp.maximum((counts[:, 0] * valid).sum(), 1.0)


def train_step(state: TrainState, batch, *, graphdef, tx: optax.GradientTransformation,
               schedule, cfg: loss_lib.LossConfig, accumulation_steps: int,
               logits_chunk_size: int = 0):
    """One optimizer update over `accumulation_steps` micro-batches of the global batch.

    Each micro-batch's objective is normalised by the global batch's pair and token counts, so the
    summed gradients equal those of one large batch exactly.
    """
    num_pairs, num_sft_tokens = _denominators(batch)

    def objective(params, micro):
        sums, nll_sum, _ = pair_forward(graphdef, params, micro, cfg, logits_chunk_size)
        obj = sums["simpo_loss"] / num_pairs
        if cfg.sft_weight:
            obj = obj + cfg.sft_weight * nll_sum / num_sft_tokens
        return obj, sums

    grad_fn = jax.grad(objective, has_aux=True)
    if accumulation_steps == 1:
        grads, sums = grad_fn(state.params, batch)
    else:
        # [G, ...] -> [accum, G/accum, ...] so every micro-batch spans all data-parallel devices.
        def split(x):
            x = x.reshape(x.shape[0] // accumulation_steps, accumulation_steps, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro_batches = jax.tree.map(split, batch)

        def body(carry, micro):
            g_acc, s_acc = carry
            g, s = grad_fn(state.params, micro)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        zeros_s = jax.eval_shape(lambda p, m: grad_fn(p, m)[1], state.params,
                                 jax.tree.map(lambda x: x[0], micro_batches))
        zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_s)
        (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro_batches)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = loss_lib.finalize_metrics(sums, cfg)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["num_tokens"] = jnp.sum(batch["lengths"] * batch["pair_mask"][:, None])
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_sums(params, batch, *, graphdef, cfg: loss_lib.LossConfig, logits_chunk_size: int = 0):
    """Metric sums of one eval batch; add them up over the split, then `finalize_metrics`."""
    sums, _, _ = pair_forward(graphdef, params, batch, cfg, logits_chunk_size)
    return sums


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """Pairs split over data x fsdp; chosen and rejected of a pair stay on one device."""
    return {
        "input_ids": NamedSharding(mesh, P(sharding_lib.BATCH_AXES, None, None)),
        "completion_start": NamedSharding(mesh, P(sharding_lib.BATCH_AXES, None)),
        "lengths": NamedSharding(mesh, P(sharding_lib.BATCH_AXES, None)),
        "pair_mask": NamedSharding(mesh, P(sharding_lib.BATCH_AXES)),
    }


def state_shardings(mesh: Mesh, abstract_state: TrainState) -> TrainState:
    """Parameters and optimizer moments follow the partition table; scalars are replicated."""
    return TrainState(
        step=sharding_lib.replicated(mesh),
        params=sharding_lib.param_shardings(mesh, abstract_state.params),
        opt_state=_opt_state_shardings(mesh, abstract_state.opt_state),
    )


def _opt_state_shardings(mesh, opt_state):
    # Optimizer moments mirror the parameter tree (and its paths); counts are scalars.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(
            mesh, sharding_lib.spec_for(sharding_lib.path_str(path), x.shape, mesh)),
        opt_state)


def init_state(params, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def jit_train_step(mesh, abstract_state, **kwargs):
    """The train step, jitted once with explicit in/out shardings and the state donated."""
    state_sh = state_shardings(mesh, abstract_state)
    fn = functools.partial(train_step, **kwargs)
    return jax.jit(fn, in_shardings=(state_sh, batch_shardings(mesh)),
                   out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=(0,)), state_sh


def jit_eval_step(mesh, param_sh, **kwargs):
    fn = functools.partial(eval_sums, **kwargs)
    return jax.jit(fn, in_shardings=(param_sh, batch_shardings(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
