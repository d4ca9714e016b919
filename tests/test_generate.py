"""generate(mode="ar"): golden greedy tokens, ragged batches, EOS, sampling, errors, compiles."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.generate import _program
from tests.conftest import GOLDEN_DIR


def _load(path, eos: int = 127):
    """A fixture checkpoint whose EOS (127) is rare, so rows run to their budget."""
    model = nld_jax.load_model(path, dtype="float32", lora=False)
    model.config = dataclasses.replace(model.config, eos_token_ids=(eos,))
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return _load(GOLDEN_DIR / "gqa4_theta1e6")


def _greedy_reference(model, prompt: list[int], n: int, width: int = 64) -> list[int]:
    """Full causal forwards without a cache; padding after the sequence cannot affect it."""
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(np.argmax(np.asarray(model(padded))[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_tokens_equal_transformers(golden_case):
    path, golden = golden_case
    model = nld_jax.load_model(path, dtype="float32", lora=False)
    # Golden tokens ran without an EOS stop: pick an EOS id that never occurs in them, then
    # one that does, to check the stop lands exactly on it.
    for i in range(3):
        want = golden[f"ar_tokens_{i}"].tolist()
        absent = next(t for t in range(128) if t not in want)
        prompt = [golden[f"ar_prompt_{i}"].tolist()]
        out = nld_jax.generate(model, prompt, max_new_tokens=48, eos_token_ids=[absent])
        assert out.tokens[0] == want
        assert out.num_forwards == 47  # the first token comes from the prefill
        eos = want[20]
        out = nld_jax.generate(model, prompt, max_new_tokens=48, eos_token_ids=[eos])
        assert out.tokens[0] == want[:want.index(eos) + 1]


def test_ragged_batch_equals_single_rows(golden_case):
    path, golden = golden_case
    model = _load(path)
    prompts = [golden[f"ar_prompt_{i}"].tolist() for i in range(3)] + [[5]]
    out = nld_jax.generate(model, prompts, max_new_tokens=20)
    for prompt, tokens, i in zip(prompts, out.tokens, range(4), strict=True):
        if i < 3:
            assert tokens == golden[f"ar_tokens_{i}"][:20].tolist()
        else:
            assert tokens == _greedy_reference(model, prompt, 20)


def test_rows_stop_independently(tiny_model):
    model = tiny_model
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    free = nld_jax.generate(model, prompts, max_new_tokens=24).tokens
    eos = free[0][6]
    assert eos not in free[1][:10] or free[1].index(eos) > 6
    out = nld_jax.generate(model, prompts, max_new_tokens=24, eos_token_ids=[eos])
    assert out.tokens[0] == free[0][:free[0].index(eos) + 1]
    expect_1 = free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert out.tokens[1] == expect_1
    assert out.num_forwards == max(len(t) for t in out.tokens) - 1


def test_budget_one_and_array_prompts(tiny_model):
    prompts = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    out = nld_jax.generate(tiny_model, prompts, max_new_tokens=1)
    assert [len(t) for t in out.tokens] == [1, 1] and out.num_forwards == 0


def test_no_recompile_within_a_bucket(tiny_model):
    nld_jax.generate(tiny_model, [[1, 2, 3], [4, 5]], max_new_tokens=10)
    before = _program._cache_size()
    nld_jax.generate(tiny_model, [[7, 8, 9, 10, 11, 12], [1]], max_new_tokens=13,
                     temperature=0.7, top_p=0.9, seed=3)
    nld_jax.generate(tiny_model, [[2] * 16, [3] * 2], max_new_tokens=16)
    assert _program._cache_size() == before
    nld_jax.generate(tiny_model, [[2] * 17, [3] * 2], max_new_tokens=16)  # next prompt bucket
    assert _program._cache_size() == before + 1


def test_sampling_is_seeded_and_follows_temperature(tiny_model):
    prompt = [[1, 2, 3, 4]] * 64
    a = nld_jax.generate(tiny_model, prompt, max_new_tokens=8, temperature=1.0, seed=1).tokens
    b = nld_jax.generate(tiny_model, prompt, max_new_tokens=8, temperature=1.0, seed=1).tokens
    c = nld_jax.generate(tiny_model, prompt, max_new_tokens=8, temperature=1.0, seed=2).tokens
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 32  # rows draw independently
    greedy = nld_jax.generate(tiny_model, prompt[:1], max_new_tokens=8).tokens[0]
    cold = nld_jax.generate(tiny_model, prompt, max_new_tokens=8, temperature=1e-4).tokens
    assert all(r == greedy for r in cold)
    top1 = nld_jax.generate(tiny_model, prompt, max_new_tokens=8, temperature=1.0, top_k=1)
    assert all(r == greedy for r in top1.tokens)
    nucleus = nld_jax.generate(tiny_model, prompt, max_new_tokens=8, temperature=1.0,
                               top_p=1e-6)
    assert all(r == greedy for r in nucleus.tokens)


def test_first_token_distribution_matches_softmax(tiny_model):
    """Temperature sampling draws from softmax(logits / T): a chi-square test at alpha = 1e-3."""
    prompt = [5, 6, 7]
    temperature = 2.0
    logits = np.asarray(tiny_model(jnp.asarray([prompt])))[0, -1] / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    out = nld_jax.generate(tiny_model, [prompt] * 2000, max_new_tokens=1,
                           temperature=temperature, seed=11)
    counts = np.bincount([t[0] for t in out.tokens], minlength=probs.size)
    expected = probs * 2000
    keep = expected >= 5  # pool the rare tokens into one cell, as the test requires
    observed, wanted = counts[keep], expected[keep]
    if expected[~keep].sum() > 0:
        observed = np.append(observed, counts[~keep].sum())
        wanted = np.append(wanted, expected[~keep].sum())
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    dof = observed.size - 1
    # Wilson-Hilferty: the chi-square quantile at 1 - 1e-3 (z = 3.09).
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < critical, (chi2, critical, dof)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(prompts=[[]]), ValueError, "prompt 0 is empty"),
    (dict(prompts=[]), ValueError, "prompts is empty"),
    (dict(prompts=[[1, 2], [3, 500]]), ValueError, "token id 500 outside the vocabulary"),
    (dict(prompts=[[1, -2]]), ValueError, "token id -2"),
    (dict(prompts="hello"), TypeError, "no tokenizer"),
    (dict(prompts=[[1.5, 2.0]]), TypeError, "integers"),
    (dict(prompts=[[1]], max_new_tokens=0), ValueError, "max_new_tokens=0"),
    (dict(prompts=[[1]], max_new_tokens=600), ValueError, "max_position_embeddings=512"),
    (dict(prompts=[[1] * 30], max_new_tokens=10, max_cache_len=32), ValueError,
     "max_cache_len=32"),
    (dict(prompts=[[1]], temperature=-1.0), ValueError, "temperature=-1.0"),
    (dict(prompts=[[1]], top_p=0.0), ValueError, "top_p=0.0"),
    (dict(prompts=[[1]], mode="beam"), ValueError, "unknown mode='beam'"),
    (dict(prompts=[[1]], eos_token_ids=[128]), ValueError, "eos_token_ids=(128,)"),
])
def test_bad_arguments(tiny_model, kwargs, error, message):
    prompts = kwargs.pop("prompts")
    with pytest.raises(error) as info:
        nld_jax.generate(tiny_model, prompts, **kwargs)
    assert message in str(info.value)


def test_fixed_cache_len(tiny_model):
    prompt = [[4, 5, 6, 7]]
    want = nld_jax.generate(tiny_model, prompt, max_new_tokens=20).tokens
    assert nld_jax.generate(tiny_model, prompt, max_new_tokens=20, max_cache_len=24).tokens == want


def test_long_prompts_get_buckets_within_a_quarter_of_their_length():
    """Powers of two up to 4096 (short prompts share few programs); past it 4/5/6/7 x 2^k,
    so a long prompt's cache is at most 25% over its length, not up to 100%."""
    from nld_jax.generate import _bucket

    assert [_bucket(n) for n in (1, 17, 4096, 4097, 9000, 16385, 32768)] == \
        [16, 32, 4096, 5120, 10240, 20480, 32768]
    # Programs for every prompt length up to 32k: 9 powers of two to 4096, then 12 (powers of
    # two alone: 12 in all).
    assert len({_bucket(n) for n in range(1, 32769)}) == 21
    for n in range(4097, 70000, 61):
        assert n <= _bucket(n) < 1.25 * n and _bucket(n) % 1024 == 0, n
