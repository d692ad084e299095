"""The jitted train step: identical on 1 device and on 8 with several mesh shapes; accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import optim
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib

TINY = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False)
LOSS = loss_lib.LossConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1)
OPT = optim.OptimConfig(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_ratio=0.0,
                        warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                        adam_epsilon=1e-8, max_grad_norm=1.0)


def make_batch(num_pairs=16, t=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], size=(num_pairs, 2, t)).astype(np.int32)
    start = rng.integers(2, 8, size=(num_pairs, 1)).repeat(2, 1).astype(np.int32)
    lengths = np.minimum(start + rng.integers(1, 14, size=(num_pairs, 2)), t).astype(np.int32)
    ids[np.arange(t)[None, None, :] >= lengths[..., None]] = 0
    return {"input_ids": ids, "completion_start": start, "lengths": lengths,
            "pair_mask": np.ones(num_pairs, np.float32)}


def run_step(mesh, batch, accumulation_steps=1, steps=2):
    model = models.from_config(TINY, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = optim.make_optimizer(OPT, total_steps=10)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(mesh, abstract, graphdef=graphdef, tx=tx,
                                           schedule=schedule, cfg=LOSS,
                                           accumulation_steps=accumulation_steps)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    sh = step_lib.batch_shardings(mesh)
    losses = []
    for _ in range(steps):
        state, metrics = fn(state, {k: jax.device_put(v, sh[k]) for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), state


MESHES = [(8, 1, 1), pytest.param((1, 8, 1), marks=pytest.mark.slow),
          pytest.param((1, 4, 2), marks=pytest.mark.slow), (2, 2, 2)]


@pytest.fixture(scope="module")
def single_device_result():
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    return run_step(mesh, make_batch())


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_equals_single_device(single_device_result, shape):
    assert len(jax.devices()) == 8
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(*shape))
    losses, params, state = run_step(mesh, make_batch())
    ref_losses, ref_params, _ = single_device_result
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params, ref_params)
    # Parameters really are sharded as the table says.
    q = state.params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    q = getattr(q, "value", q)  # an nnx.Variable inside nnx.State
    expected = sharding_lib.spec_for("model.layers.self_attn.q_proj.weight", q.shape, mesh)
    assert q.sharding.spec == expected
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
        assert any(axis is not None for axis in expected)


def test_gradient_accumulation_equals_large_batch(single_device_result):
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    losses, params, _ = run_step(mesh, make_batch(), accumulation_steps=4)
    ref_losses, ref_params, _ = single_device_result
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params, ref_params)


@pytest.mark.slow
def test_accumulation_on_sharded_mesh():
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(2, 2, 2))
    losses, params, _ = run_step(mesh, make_batch(), accumulation_steps=2)
    mesh1 = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    ref_losses, ref_params, _ = run_step(mesh1, make_batch(), accumulation_steps=1)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params, ref_params)


@pytest.mark.slow
def test_padding_pairs_do_not_change_the_update():
    batch = make_batch(num_pairs=8)
    padded = {k: np.concatenate([v, v[:8]]) for k, v in batch.items()}
    padded["pair_mask"][8:] = 0.0
    mesh1 = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    a = run_step(mesh1, batch, steps=1)
    b = run_step(mesh1, padded, steps=1)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a[1], b[1])


@pytest.mark.parametrize("chunk", [pytest.param(5, marks=pytest.mark.slow),
                                   pytest.param(8, marks=pytest.mark.slow), 64])
def test_chunked_lm_head_equals_full_logits(chunk):
    model = models.from_config(TINY, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {k: jnp.asarray(v) for k, v in make_batch(num_pairs=4).items()}

    def objective(p, c):
        sums, nll, _ = step_lib.pair_forward(graphdef, p, batch, LOSS, logits_chunk_size=c)
        return sums["simpo_loss"] + 0.1 * nll, sums

    (full, full_sums), g_full = jax.value_and_grad(objective, has_aux=True)(params, 0)
    (chunked, ch_sums), g_chunked = jax.value_and_grad(objective, has_aux=True)(params, chunk)
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
    sh = step_lib.batch_shardings(mesh)
    batch = {k: jax.device_put(v, sh[k]) for k, v in make_batch().items()}
    state, metrics = fn(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    # bf16 compute changes the numbers a little, not the result: close to the float32 update.
    ref_losses = run_step(sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 8, 1)), make_batch(),
                          steps=1)[0]
    assert np.isfinite(float(metrics["loss"]))
    assert abs(float(metrics["loss"]) - ref_losses[0]) < 0.05
