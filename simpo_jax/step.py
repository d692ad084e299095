"""Train state and the pure SimPO train/eval steps, jitted once with explicit shardings.

A batch is a data.batch.PaddedBatch (B pairs of T tokens) or PackedBatch (R rows holding several
pairs, batch_layout "packed" or "shared_prompt"); `pair_forward` and the steps ask which it is.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from simpo_jax import loss as loss_lib
from simpo_jax import sharding as sharding_lib
from simpo_jax.data.batch import PackedBatch, batch_shardings
from simpo_jax.models import head as head_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates done
    params: Any  # nnx.State of the trained leaves: every nnx.Param, or with LoRA the adapters
    opt_state: Any


def with_frozen(params, frozen):
    """The model's whole state: the trained params plus, with LoRA, the frozen base."""
    return params if frozen is None else nnx.merge_state(params, frozen)


def pair_forward(graphdef, params, batch, cfg: loss_lib.LossConfig, logits_chunk_size: int = 0):
    """Chosen and rejected of every pair in one forward pass: per-pair sums and the objective parts.

    logits_chunk_size > 0 applies the LM head that many positions at a time (never materialising
    full-sequence logits); 0 computes all logits at once.
    """
    logps, counts, mean_logits, token_sums, pair_mask = pair_stats(graphdef, params, batch,
                                                                   logits_chunk_size)
    return loss_lib.pair_metric_sums(logps, counts, mean_logits, pair_mask, token_sums, cfg)


def pair_stats(graphdef, params, batch, logits_chunk_size: int = 0):
    """Per pair [pairs, 2]: avg completion logp, scored tokens, mean logit, summed logp; pair mask.

    Either batch format; packed rows give R * max_pairs_per_row pair slots (row-major).
    """
    if isinstance(batch, PackedBatch):
        return packed_pair_stats(graphdef, params, batch, logits_chunk_size)
    model = nnx.merge(graphdef, params)
    ids = batch.input_ids
    b, two, t = ids.shape
    flat_ids = ids.reshape(b * two, t)
    starts, lengths = batch.completion_start.reshape(-1), batch.lengths.reshape(-1)
    mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden = model.hidden_states(flat_ids, mask)[:, :-1]  # position t predicts token t + 1
    tok_logps, tok_mean_logits = scored_token_stats(hidden, model, flat_ids[:, 1:],
                                                    logits_chunk_size)
    scored = loss_lib.completion_mask(starts, lengths, t).astype(jnp.float32)
    counts = scored.sum(-1)
    safe = jnp.maximum(counts, 1.0)  # an empty completion gives 0, never NaN; such pairs are masked
    logps, counts, mean_logits = (x.reshape(b, two) for x in (
        (tok_logps * scored).sum(-1) / safe, counts, (tok_mean_logits * scored).sum(-1) / safe))
    return logps, counts, mean_logits, logps * counts, batch.pair_mask


def scored_token_stats(h_RND, model, targets_RN, chunk_size: int = 0):
    """Per scored token (log p(target), mean logit) [R, N] from gathered hidden states [R, N, D].

    The fused head (models/head.token_logps) sees a 2-D [R*N, D] activation: logsumexp and the
    target's logit (a row gather of the head, so no [R*N, V] one-hot or scatter) in one pass, the
    softmax gradient in one more, and without soft-capping the mean logit as h . mean_v(W_v) with
    no pass over the vocabulary. chunk_size > 0 applies it to chunk_size tokens at a time,
    recomputed in the backward pass, so [R*N, V] float32 logits never exist.
    """
    r, n, d = h_RND.shape
    logps, mean_logits = head_lib.token_logps(
        h_RND.reshape(r * n, d), model.head_weight(), targets_RN.reshape(-1),
        final_softcap=model.arch.final_softcap, chunk_size=chunk_size)
    return logps.reshape(r, n), mean_logits.reshape(r, n)


def packed_pair_stats(graphdef, params, batch, logits_chunk_size: int = 0):
    """`pair_stats` of packed / shared-prompt rows: the LM head runs on scored tokens only."""
    model = nnx.merge(graphdef, params)
    segments = batch.segment_ids
    hidden = model.hidden_states(batch.input_ids, (segments > 0).astype(jnp.int32),
                                 positions=batch.positions, segment_ids=segments,
                                 branch_ids=batch.branch_ids,
                                 attention_blocks=batch.attention_blocks)
    r, t, d = hidden.shape
    groups = batch.score_index.shape[0]  # score groups of g = r / groups rows (packed_rows.py)
    h = jnp.take_along_axis(hidden.reshape(groups, r // groups * t, d),
                            batch.score_index[..., None], axis=1)  # [R/g, g*N, D]
    tok_logps, tok_mean_logits = scored_token_stats(h, model, batch.score_target,
                                                    logits_chunk_size)
    p = batch.pair_mask.shape[1]
    # Per-group sums into (pair slot, side) by a one-hot contraction: local to each group (shard).
    onehot = _slot_onehot(batch)
    token_sums, logit_sums = (jnp.einsum("rn,rnk->rk", x, onehot).reshape(r * p, 2)
                              for x in (tok_logps, tok_mean_logits))
    counts, pair_mask = scored_counts(batch)
    safe = jnp.maximum(counts, 1.0)
    return token_sums / safe, counts, logit_sums / safe, token_sums, pair_mask


def _slot_onehot(batch):
    """[R/g, g*N, 2*g*P] float32: a group's scored token n belongs to (row k, pair slot, side) at
    2 * (k * P + slot) + side; slot -1: none."""
    r, p = batch.pair_mask.shape
    g = r // batch.score_slot.shape[0]
    return jax.nn.one_hot(batch.score_slot, 2 * g * p, dtype=jnp.float32)


def scored_counts(batch):
    """([pairs, 2] scored tokens of chosen and rejected, [pairs] pair mask), from the batch alone.

    The tokens the loss scores and no others: the padded layout's loss.completion_mask, the packed
    rows' score slots. Known before the forward pass, so the train step's denominators use it.
    """
    if isinstance(batch, PackedBatch):
        # packed_rows.py scores a completion's tokens from index 1 of its sequence on: all of them
        # after a prompt, all but the first after an empty prompt.
        first = (batch.prompt_lengths == 0)[..., None].astype(jnp.int32)
        scored = jnp.maximum(batch.completion_lengths - first, 0).astype(jnp.float32)
        pair_mask = batch.pair_mask.reshape(-1)
        return scored.reshape(-1, 2) * pair_mask[:, None], pair_mask
    ids = batch.input_ids
    mask = loss_lib.completion_mask(batch.completion_start, batch.lengths, ids.shape[-1])
    return mask.sum(-1).astype(jnp.float32), batch.pair_mask


def _num_tokens(batch):
    """Real (non-padding) tokens the model computes: a shared prompt counts once."""
    if isinstance(batch, PackedBatch):
        return jnp.sum(batch.segment_ids > 0)
    return jnp.sum(batch.lengths * batch.pair_mask[:, None])


def denominators(batch):
    """(pairs, chosen tokens) the loss averages over in the whole (global) batch, at least 1 each.

    The rule of the loss itself (scored_counts, loss.pair_weights), applied before the forward pass.
    """
    _, num_pairs, num_tokens = loss_lib.pair_weights(*scored_counts(batch))
    return jnp.maximum(num_pairs, 1.0), jnp.maximum(num_tokens, 1.0)


def train_step(state: TrainState, batch, frozen=None, *, graphdef,
               tx: optax.GradientTransformation, schedule, cfg: loss_lib.LossConfig,
               accumulation_steps: int, logits_chunk_size: int = 0, opt_state_memory=None):
    """One optimizer update over `accumulation_steps` micro-batches of the global batch.

    frozen: with LoRA, the base model's state (not differentiated, not updated).

    Each micro-batch's objective is normalised by the global batch's pair and token counts, so the
    summed gradients equal those of one large batch exactly. Gradients (and the accumulator) have
    the parameters' dtype. opt_state_memory = (device, host) shardings of an optimizer state kept
    in host memory: it is brought to the device for the update and sent back.
    """
    num_pairs, num_sft_tokens = denominators(batch)

    def objective(params, micro):
        sums, nll_sum, _ = pair_forward(graphdef, with_frozen(params, frozen), micro, cfg,
                                        logits_chunk_size)
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

    grad_norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    opt_state = state.opt_state
    if opt_state_memory is not None:
        opt_state = jax.device_put(opt_state, opt_state_memory[0])
    updates, opt_state = tx.update(grads, opt_state, state.params)
    if opt_state_memory is not None:
        opt_state = jax.device_put(opt_state, opt_state_memory[1])
    params = optax.apply_updates(state.params, updates)
    metrics = loss_lib.finalize_metrics(sums, cfg)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["num_tokens"] = _num_tokens(batch)
    metrics["num_pairs"] = sums["pairs"]
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_sums(params, batch, frozen=None, *, graphdef, cfg: loss_lib.LossConfig,
              logits_chunk_size: int = 0):
    """Metric sums of one eval batch; add them up over the split, then `finalize_metrics`."""
    sums, _, _ = pair_forward(graphdef, with_frozen(params, frozen), batch, cfg, logits_chunk_size)
    return sums


def state_shardings(mesh: Mesh, abstract_state: TrainState, offload: bool = False) -> TrainState:
    """Parameters and optimizer moments follow the partition table; scalars are replicated.

    offload: the optimizer state lives in host memory (memory kind pinned_host).
    """
    return TrainState(
        step=sharding_lib.replicated(mesh),
        params=sharding_lib.param_shardings(mesh, abstract_state.params),
        opt_state=_opt_state_shardings(mesh, abstract_state.opt_state,
                                       "pinned_host" if offload else None),
    )


def _opt_state_shardings(mesh, opt_state, memory_kind=None):
    # Optimizer moments mirror the parameter tree (and its paths); counts are scalars.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(
            mesh, sharding_lib.spec_for(sharding_lib.path_str(path), x.shape, mesh),
            memory_kind=memory_kind),
        opt_state)


def init_state(params, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def jit_train_step(mesh, abstract_state, batch_layout: str = "padded",
                   offload_optimizer_state: bool = False, frozen_shardings=None, **kwargs):
    """The train step, jitted once with explicit in/out shardings and the state donated.

    frozen_shardings (LoRA): the step takes the frozen base as a third argument, never donated.
    """
    state_sh = state_shardings(mesh, abstract_state, offload=offload_optimizer_state)
    if offload_optimizer_state:
        on_device = _opt_state_shardings(mesh, abstract_state.opt_state, "device")
        kwargs["opt_state_memory"] = (on_device, state_sh.opt_state)
    fn = functools.partial(train_step, **kwargs)
    in_sh = (state_sh, batch_shardings(mesh, batch_layout))
    if frozen_shardings is not None:
        in_sh += (frozen_shardings,)
    return jax.jit(fn, in_shardings=in_sh,
                   out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=(0,)), state_sh


def jit_eval_step(mesh, param_sh, batch_layout: str = "padded", frozen_shardings=None, **kwargs):
    fn = functools.partial(eval_sums, **kwargs)
    in_sh = (param_sh, batch_shardings(mesh, batch_layout))
    if frozen_shardings is not None:
        in_sh += (frozen_shardings,)
    return jax.jit(fn, in_shardings=in_sh, out_shardings=sharding_lib.replicated(mesh))


class BoundFrozen:
    """A jitted step with the frozen base (LoRA) bound as its last argument; `lower` as jit's."""

    def __init__(self, fn, frozen):
        self.fn, self.frozen = fn, frozen

    def __call__(self, *args):
        return self.fn(*args, self.frozen)

    def lower(self, *args):
        return self.fn.lower(*args, self.frozen)
