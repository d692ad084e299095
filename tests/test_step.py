"""The jitted train step: its raw gradients against a plain reference objective (denominators,
padding pairs, accumulation, edge pairs); identical on 1 device and on 8 with several mesh shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import optim
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib
from simpo_jax.data.batch import PaddedBatch, batch_shardings

TINY = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False)
LOSS = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1)
OPT = optim.OptimConfig(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_ratio=0.0,
                        warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                        adam_epsilon=1e-8, max_grad_norm=1.0, master_weights="float32",
                        optimizer_state_dtype="float32", seed=0)


def make_batch(num_pairs=16, t=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], size=(num_pairs, 2, t)).astype(np.int32)
    start = rng.integers(2, 8, size=(num_pairs, 1)).repeat(2, 1).astype(np.int32)
    lengths = np.minimum(start + rng.integers(1, 14, size=(num_pairs, 2)), t).astype(np.int32)
    ids[np.arange(t)[None, None, :] >= lengths[..., None]] = 0
    return PaddedBatch(input_ids=ids, completion_start=start, lengths=lengths,
                       pair_mask=np.ones(num_pairs, np.float32))


def keep_gradients() -> optax.GradientTransformation:
    """A stand-in optimizer: parameters stay, the step's raw gradients become the optimizer state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_gradients(mesh, graphdef, params, batch, cfg, accumulation_steps=1, layout="padded",
                   logits_chunk_size=0):
    """(raw gradients, metrics) of one jitted train step, normalisation and accumulation included."""
    tx = keep_gradients()
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(
        mesh, abstract, batch_layout=layout, graphdef=graphdef, tx=tx,
        schedule=optax.constant_schedule(0.0), cfg=cfg, accumulation_steps=accumulation_steps,
        logits_chunk_size=logits_chunk_size)
    params = jax.device_put(params, state_sh.params)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    state, metrics = fn(state, jax.device_put(jax.tree.map(np.asarray, batch),
                                              batch_shardings(mesh, layout)))
    return jax.tree.map(np.asarray, state.opt_state), metrics


def run_step(mesh, batch, accumulation_steps=1, steps=2):
    """(per-step losses, final params, state, per-step grad norms) of AdamW steps.

    Also checks each step's learning_rate metric: the schedule at the update's 0-based index.
    """
    model = models.from_config(TINY, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = optim.make_optimizer(OPT, total_steps=10)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(mesh, abstract, graphdef=graphdef, tx=tx,
                                           schedule=schedule, cfg=LOSS,
                                           accumulation_steps=accumulation_steps)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    sh = batch_shardings(mesh)
    losses, norms = [], []
    for i in range(steps):
        state, metrics = fn(state, jax.device_put(batch, sh))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(i)), rel=1e-6)
    return losses, jax.tree.map(np.asarray, state.params), state, norms


def edge_batch():
    """make_batch(16) with padding pairs and edges, and the reference's own per-token weights.

    Pair 2: empty prompt, one-token chosen (no scored chosen token: the pair does not count);
    pair 3: empty prompt, longer completions (counts, from index 1); pair 4: empty rejected;
    pairs 9 and 10: padding (copies of pair 0, pair_mask 0).
    """
    batch = make_batch(num_pairs=16, seed=5)
    batch.completion_start[2:4] = 0
    batch.lengths[2] = [1, 6]
    batch.lengths[3] = [5, 7]
    batch.lengths[4, 1] = batch.completion_start[4, 1]
    for x in jax.tree.leaves(batch):
        x[9:11] = x[0]
    batch.pair_mask[9:11] = 0.0
    t = batch.input_ids.shape[-1]
    batch.input_ids[np.arange(t)[None, None, :] >= batch.lengths[..., None]] = 0
    # weights[b, k, j] = 1 where target token j + 1 is a completion token with a predictor
    weights = np.zeros((16, 2, t - 1), np.float32)
    for b in range(16):
        for k in range(2):
            for j in range(t - 1):
                weights[b, k, j] = batch.completion_start[b, k] <= j + 1 < batch.lengths[b, k]
    valid = batch.pair_mask * (weights[:, 0].sum(-1) > 0) * (weights[:, 1].sum(-1) > 0)
    assert valid.tolist() == [1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    return batch, weights, valid


def plain_objective(graphdef, batch, weights, valid, cfg):
    """The SimPO objective written out from the model's logits: mean loss over the counted pairs
    plus sft_weight * NLL per counted chosen token."""
    ids = jnp.asarray(batch.input_ids).reshape(-1, batch.input_ids.shape[-1])
    attention = (np.arange(ids.shape[1])[None] < batch.lengths.reshape(-1, 1)).astype(np.int32)

    def fn(params):
        logits = nnx.merge(graphdef, params)(ids, jnp.asarray(attention))[:, :-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                   ids[:, 1:, None], axis=-1)[..., 0].reshape(weights.shape)
        avg = (logp * weights).sum(-1) / np.maximum(weights.sum(-1), 1)
        z = cfg.beta * (avg[:, 0] - avg[:, 1] - cfg.gamma_beta_ratio)
        simpo = -(jax.nn.log_sigmoid(z) * valid).sum() / valid.sum()
        nll = -(logp[:, 0] * weights[:, 0] * valid[:, None]).sum() / (
            weights[:, 0] * valid[:, None]).sum()
        return simpo + cfg.sft_weight * nll

    return fn


@pytest.mark.slow
def test_step_gradients_equal_plain_objective():
    """Raw gradients of the jitted step (4 micro-batches on a 2x2x2 mesh): the pairs that count
    and their tokens, as the loss scores them (tests/test_trl_parity.py: the same against TRL)."""
    batch, weights, valid = edge_batch()
    graphdef, params = nnx.split(models.from_config(TINY, seed=3), nnx.Param)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(2, 2, 2))
    assert [float(x) for x in step_lib.denominators(batch)] == [
        valid.sum(), (weights[:, 0].sum(-1) * valid).sum()]
    grads, metrics = step_gradients(mesh, graphdef, params, batch, LOSS, accumulation_steps=4)
    ref = jax.jit(jax.grad(plain_objective(graphdef, batch, weights, valid, LOSS)))(params)
    assert float(metrics["num_pairs"]) == valid.sum() == 12
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(ref)), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()), grads, ref)


MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]


@pytest.fixture(scope="module")
def single_device_result():
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    return run_step(mesh, make_batch())


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_equals_single_device(single_device_result, shape):
    assert len(jax.devices()) == 8
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(*shape))
    losses, params, state, norms = run_step(mesh, make_batch())
    ref_losses, ref_params, _, ref_norms = single_device_result
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)  # AdamW alone hides a gradient scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params, ref_params)
    # Parameters really are sharded as the table says.
    q = state.params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    q = getattr(q, "value", q)  # an nnx.Variable inside nnx.State
    expected = sharding_lib.spec_for("model.layers.self_attn.q_proj.weight", q.shape, mesh)
    assert q.sharding.spec == expected
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
        assert any(axis is not None for axis in expected)


@pytest.mark.slow
def test_gradient_accumulation_equals_large_batch(single_device_result):
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    losses, params, _, norms = run_step(mesh, make_batch(), accumulation_steps=4)
    ref_losses, ref_params, _, ref_norms = single_device_result
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params, ref_params)


@pytest.mark.slow
def test_accumulation_on_sharded_mesh():
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(2, 2, 2))
    losses, params, _, norms = run_step(mesh, make_batch(), accumulation_steps=2)
    mesh1 = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    ref_losses, ref_params, _, ref_norms = run_step(mesh1, make_batch(), accumulation_steps=1)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params, ref_params)


@pytest.mark.slow
def test_padding_pairs_do_not_change_the_update():
    batch = make_batch(num_pairs=8)
    padded = jax.tree.map(lambda v: np.concatenate([v, v[:8]]), batch)
    padded.pair_mask[8:] = 0.0
    mesh1 = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    a = run_step(mesh1, batch, steps=1)
    b = run_step(mesh1, padded, steps=1)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[3], b[3], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a[1], b[1])


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_chunked_lm_head_equals_full_logits(chunk):
    model = models.from_config(TINY, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = jax.tree.map(jnp.asarray, make_batch(num_pairs=4))

    def objective(p, c):
        sums, nll, _ = step_lib.pair_forward(graphdef, p, batch, LOSS, logits_chunk_size=c)
        return sums["simpo_loss"] + 0.1 * nll, sums

    fn = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (full, full_sums), g_full = fn(params, 0)
    (chunked, ch_sums), g_chunked = fn(params, chunk)
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    for k in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        np.testing.assert_allclose(float(ch_sums[k]), float(full_sums[k]), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g_chunked, g_full)


@pytest.mark.slow
def test_bf16_compute_over_float32_master_params():
    model = models.from_config(TINY, seed=3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tx, schedule = optim.make_optimizer(OPT, total_steps=10)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 8, 1))
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(mesh, abstract, graphdef=graphdef, tx=tx,
                                           schedule=schedule, cfg=LOSS, accumulation_steps=1)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    batch = jax.device_put(make_batch(), batch_shardings(mesh))
    state, metrics = fn(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    # bf16 compute changes the numbers a little, not the result: close to the float32 update.
    ref_losses = run_step(sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 8, 1)), make_batch(),
                          steps=1)[0]
    assert np.isfinite(float(metrics["loss"]))
    assert abs(float(metrics["loss"]) - ref_losses[0]) < 0.05
