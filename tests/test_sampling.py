"""Sampling for on-policy data, against transformers (top-p, greedy at low temperature, several
EOS ids) and against the distribution it should draw from (a chi-square test)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy import stats

from simpo_jax import models
from simpo_jax.models import generate as greedy_lib
from simpo_jax.onpolicy import generate as generate_lib
from simpo_jax.onpolicy import sampling
from test_onpolicy import COMMON, mesh


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_keeps_what_transformers_keeps(top_p):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 50)).astype(np.float32) * 3
    ref = transformers.TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
    got = np.asarray(sampling.top_p_filter(jnp.asarray(logits), top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])
    kept = np.isfinite(got).sum(-1)
    assert kept.min() >= 1 and (kept < 50).all()


def expected_probs(logits, temperature, top_p):
    """softmax(logits / T) restricted to the nucleus, computed in numpy (not by our code)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for i in order:  # smallest set of most probable tokens whose mass reaches top_p
        keep[i] = True
        mass += p[i]
        if mass >= top_p:
            break
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def draw(logits, temperature, top_p, n):
    keys = jnp.asarray(sampling.row_keys(np.full(n, 7), np.arange(n)))
    tokens = jax.jit(lambda k: sampling.next_tokens(
        jnp.broadcast_to(jnp.asarray(logits), (n, len(logits))), k, 3,
        temperature=temperature, top_p=top_p))(keys)
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def chi_square_p(counts, probs):
    """p-value of the counts under `probs`; 0 when a token outside its nucleus was drawn."""
    keep = probs > 0
    if counts[~keep].sum():
        return 0.0
    return stats.chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


@pytest.mark.slow
def test_sampled_token_distribution_matches_softmax_over_temperature():
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    n = 40_000
    counts = draw(logits, 0.8, 0.95, n)
    assert chi_square_p(counts, expected_probs(logits, 0.8, 0.95)) > 1e-3
    # The test has the power to see a wrong temperature or no top-p.
    assert chi_square_p(counts, expected_probs(logits, 1.0, 0.95)) < 1e-6
    assert chi_square_p(counts, expected_probs(logits, 0.6, 0.95)) < 1e-6
    assert expected_probs(logits, 0.8, 1.0)[-1] > 0 and counts[-1] == 0


def hf_causal(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(tmp_path / "policy")
    return models.from_pretrained(str(tmp_path / "policy"), mesh=mesh())


PROMPTS = [[1, 5, 17, 33, 8, 9, 41], [1, 60, 7], [1, 11, 12, 13, 14], [1, 70, 71, 72]]


@pytest.mark.slow
def test_low_temperature_sampling_equals_greedy(tmp_path):
    model = hf_causal(tmp_path)
    greedy = greedy_lib.greedy_generate(model, PROMPTS, max_new_tokens=10, eos_token_id=2,
                                        pad_token_id=0)
    keys = sampling.row_keys([13, 21, 42, 79], range(4))
    got = sampling.sample(model, PROMPTS, keys, max_new_tokens=10, eos_token_id=2, pad_token_id=0,
                          temperature=1e-5, top_p=0.95, mesh=mesh(), prompt_length=16)
    zero = sampling.sample(model, PROMPTS, keys, max_new_tokens=10, eos_token_id=2,
                           pad_token_id=0, temperature=0.0, top_p=0.95, mesh=mesh(),
                           prompt_length=16)
    for row, row_zero, ref in zip(got, zero, greedy):
        ref = list(map(int, ref))
        ref = ref[:ref.index(2) + 1] if 2 in ref else ref
        assert row == row_zero == ref
    assert len({tuple(r) for r in got}) > 1


@pytest.mark.slow
def test_rows_stop_at_any_of_several_eos_ids(tmp_path):
    """generation_config.json's eos list (Gemma-2-it: <eos>, <end_of_turn>) stops a row too."""
    model = hf_causal(tmp_path)
    greedy = sampling.sample(model, PROMPTS, sampling.row_keys([1] * 4, range(4)),
                             max_new_tokens=10, eos_token_id=2, pad_token_id=0, temperature=0.0,
                             top_p=1.0)
    other = next(t for row in greedy for t in row[1:-1] if t != 2)  # drawn mid-answer somewhere
    (tmp_path / "policy" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, other]}))
    tokenizer = type("Tokenizer", (), {"eos_token_id": 2})()
    stops = generate_lib.stop_token_ids(tokenizer, str(tmp_path / "policy"))
    assert stops == tuple(sorted({2, other}))
    got = sampling.sample(model, PROMPTS, sampling.row_keys([1] * 4, range(4)), max_new_tokens=10,
                          eos_token_id=stops, pad_token_id=0, temperature=0.0, top_p=1.0)
    for row, ref in zip(got, greedy):
        ends = [i for i, t in enumerate(ref) if t in stops]
        assert row == (ref[:ends[0] + 1] if ends else ref)
    assert got != greedy


@pytest.mark.slow
def test_fixed_seeds_reproduce_samples(tmp_path):
    model = hf_causal(tmp_path)
    run = lambda seeds, rows=None: sampling.sample(
        model, PROMPTS, sampling.row_keys(seeds, range(4)), max_new_tokens=12, eos_token_id=2,
        pad_token_id=0, temperature=1.0, top_p=0.95, mesh=mesh(), batch_rows=rows)
    first = run([13, 21, 42, 79])
    assert run([13, 21, 42, 79]) == first
    assert run([13, 21, 42, 79], rows=16) == first  # another batch shape, the same draws
    assert run([14, 22, 43, 80]) != first
