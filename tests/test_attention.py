"""Block-sparse attention of packed rows: the listed tiles are exactly those with a visible key,
and computing only them equals the dense masked softmax (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simpo_jax import models
from simpo_jax.data import PACKED_LAYOUTS, packed, packed_rows
from simpo_jax.data.pairs import TokenizedPairs
from simpo_jax.models import layers as L
from test_packing import GEMMA2, LLAMA


def pairs_of(lengths, seed=0):
    """TokenizedPairs with (prompt, chosen, rejected) lengths; token ids are irrelevant here."""
    rng = np.random.default_rng(seed)
    ids = [[rng.integers(3, 50, n).astype(np.int32) for n in part] for part in zip(*lengths)]
    return TokenizedPairs(*ids, sources=[f"t:{i}" for i in range(len(lengths))])


# Prompts and completions crossing block edges, an empty prompt, an empty completion, a row whose
# length is not a whole number of blocks.
LENGTHS = [(70, 40, 90), (0, 30, 5), (20, 0, 64), (130, 64, 1), (5, 6, 7), (63, 65, 66)]


def dense_block_mask(batch, row_length):
    mask = np.asarray(L.base_mask(jnp.asarray(batch.segment_ids > 0),
                                  jnp.asarray(batch.segment_ids),
                                  jnp.asarray(batch.branch_ids)))
    nb = -(-row_length // L.SPARSE_BLOCK)
    pad = nb * L.SPARSE_BLOCK - row_length
    mask = np.pad(mask, ((0, 0), (0, pad), (0, pad)))
    return mask.reshape(len(mask), nb, L.SPARSE_BLOCK, nb, L.SPARSE_BLOCK).any(axis=(2, 4))


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_listed_tiles_are_exactly_those_with_a_visible_key(layout):
    pairs = pairs_of(LENGTHS)
    row_length = 1000
    rows = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([5]), np.zeros(0, np.int64)]
    batch = packed_rows.make_rows(pairs, rows, layout=layout, pad_id=0, row_length=row_length,
                                  max_pairs_per_row=4)
    want = dense_block_mask(batch, row_length)
    for r, listed in enumerate(batch.attention_blocks):
        listed = listed[listed[:, 0] >= 0]
        got = np.zeros_like(want[r])
        got[listed[:, 0], listed[:, 1]] = True
        assert len(listed) == got.sum()  # no pair listed twice
        np.testing.assert_array_equal(got, want[r])
    # Fewer tiles than the causal triangle a dense kernel computes.
    nb = want.shape[1]
    assert batch.attention_blocks.shape[1] < nb * (nb + 1) // 2


def attention_inputs(layout, row_length, seed=0, heads=4, kv_heads=2, head_dim=8, window=None):
    pairs = pairs_of(LENGTHS, seed)
    rows = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]
    batch = packed_rows.make_rows(pairs, rows, layout=layout, pad_id=0, row_length=row_length,
                                  max_pairs_per_row=3)
    seg = jnp.asarray(batch.segment_ids)
    mask = L.base_mask(seg > 0, seg, jnp.asarray(batch.branch_ids))
    if window is not None:
        mask &= L.window_mask(jnp.asarray(batch.positions), window)
    keys = jax.random.split(jax.random.key(seed), 4)
    b, t = seg.shape
    q = jax.random.normal(keys[0], (b, t, heads, head_dim)) * 2.0
    k = jax.random.normal(keys[1], (b, t, kv_heads, head_dim)) * 2.0
    v = jax.random.normal(keys[2], (b, t, kv_heads, head_dim))
    cot = jax.random.normal(keys[3], q.shape) * (seg > 0)[:, :, None, None]  # real queries only
    return q, k, v, mask, jnp.asarray(batch.attention_blocks), cot, seg > 0


@pytest.mark.parametrize("layout,row_length,softcap,window", [
    pytest.param("shared_prompt", 448, None, None, marks=pytest.mark.slow),  # Llama
    pytest.param("packed", 700, None, None, marks=pytest.mark.slow),  # not whole blocks
    ("shared_prompt", 448, 2.0, 4),  # Gemma 2: soft-capped logits, a 4-token sliding window
    pytest.param("packed", 700, 2.0, 100, marks=pytest.mark.slow),
])
def test_block_sparse_equals_dense_attention(layout, row_length, softcap, window):
    q, k, v, mask, blocks, cot, real = attention_inputs(layout, row_length, window=window)
    scale = 0.3

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * cot).sum()

    def dense(q, k, v):
        return L.attention(q, k, v, mask, scale=scale, softcap=softcap)

    def sparse(q, k, v):
        return L.block_sparse_attention(q, k, v, mask, blocks, scale=scale, softcap=softcap)

    got, want = jax.jit(sparse)(q, k, v), jax.jit(dense)(q, k, v)
    keep = np.asarray(real)[:, :, None, None]
    np.testing.assert_allclose(np.where(keep, got, 0), np.where(keep, want, 0), atol=1e-5,
                               rtol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # padding queries see nothing: 0, not NaN
    g_got = jax.jit(jax.grad(loss(sparse), argnums=(0, 1, 2)))(q, k, v)
    g_want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_only_listed_tiles_are_computed():
    """The compiled scores are [rows, M, heads, b, b] tiles, never a [rows, ..., T, T] square."""
    q, k, v, mask, blocks, _, _ = attention_inputs("shared_prompt", 448)
    text = jax.jit(lambda q, k, v: L.block_sparse_attention(
        q, k, v, mask, blocks, scale=0.3, softcap=None)).lower(q, k, v).as_text()
    b, m = blocks.shape[:2]
    blk = L.SPARSE_BLOCK
    assert f"tensor<{b}x{m}x2x2x{blk}x{blk}xf32>" in text
    assert "448x448xf32" not in text


def test_tiles_run_only_where_they_pay():
    """A static choice from the shapes: rows of 768 listing half the triangle's tiles keep the
    causal blocks; rows of 2048 listing a quarter of them run the tiles."""
    assert not L.sparse_pays(768, 42)
    assert L.sparse_pays(2048, 128)
    assert L.sparse_pays(4096, 288)


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA, GEMMA2], ids=["llama", "gemma2_window4"])
def test_decoder_on_tiles_equals_causal_blocks(config):
    """Long rows of many short pairs (the tiles pay): the decoder's hidden states and gradients
    equal those of the causal-block attention on the same rows."""
    pairs = pairs_of([(n % 9, 3 + n % 11, 1 + n % 7) for n in range(80)], seed=3)
    row_length = 1024
    rows = packed.pack(packed.item_lengths(pairs, "shared_prompt"), row_length, 64,
                       np.random.default_rng(0))
    batch = jax.tree.map(jnp.asarray, packed_rows.make_rows(
        pairs, rows, layout="shared_prompt", pad_id=0, row_length=row_length,
        max_pairs_per_row=64))
    assert L.sparse_pays(row_length, batch.attention_blocks.shape[1])
    graphdef, params = nnx.split(models.from_config(config, seed=2), nnx.Param)
    real = (batch.segment_ids > 0)[..., None]
    cot = jax.random.normal(jax.random.key(0), real.shape[:2] + (config["hidden_size"],)) * real

    def loss(params, blocks):
        model = nnx.merge(graphdef, params)
        h = model.hidden_states(batch.input_ids, batch.segment_ids > 0,
                                positions=batch.positions, segment_ids=batch.segment_ids,
                                branch_ids=batch.branch_ids, attention_blocks=blocks)
        return (h * cot).sum(), h

    grad = jax.jit(jax.grad(loss, has_aux=True))
    g_tiles, h_tiles = grad(params, batch.attention_blocks)
    g_causal, h_causal = grad(params, None)
    np.testing.assert_allclose(np.where(real, h_tiles, 0), np.where(real, h_causal, 0),
                               atol=1e-5, rtol=1e-5)
    # Gradients within 1e-5 of each tensor's largest entry (sums over a thousand tokens).
    errors = jax.tree.map(lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)),
                          g_tiles, g_causal)
    assert max(jax.tree.leaves(errors)) < 1e-5, errors
