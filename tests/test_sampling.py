"""nld_jax.sampling: the sort-free top-p against the sort-based one it replaced, and greedy.

Oracles: the earlier implementation (sort the vocabulary, keep while the mass before a token is
short of top_p; kept here as `sorted_reference`) and the definition computed in float64 (x is
kept iff the mass of the tokens strictly above it is < top_p). float32 sums in another order
can only disagree where that mass is within rounding of top_p, so every case's top_p is drawn
at least KNIFE_EDGE away from each token's float64 mass above it; off the edge the filtered
logits must be equal bit for bit.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nld_jax.sampling import (
    WIDE_DIGITS_MAX_LOGITS,
    _order_key,
    filter_logits,
    nucleus_cutoff,
    sample_tokens,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
KNIFE_EDGE = 1e-5  # float32 sums over <= 131072 terms of a distribution stay well inside this


def sorted_reference(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """The sort-based filter_logits this module replaced (nld_jax before the radix select)."""
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)


def mass_above(scaled: np.ndarray) -> np.ndarray:
    """float64, same shape: per token, the softmax mass of the tokens strictly above it."""
    return np.apply_along_axis(_mass_above_row, -1, scaled)


def _mass_above_row(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    values = x[order]
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    first = np.searchsorted(-values, -values, side="left")  # the first of each tie group
    above = np.empty_like(x)
    above[order] = before[first]
    return above


def test_mass_above_is_the_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 4, size=(3, 40)).astype(np.float64) * 0.7
    x[0, :5] = -np.inf
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    brute = np.sum(np.where(x[..., None, :] > x[..., :, None], p[..., None, :], 0.0), axis=-1)
    np.testing.assert_allclose(mass_above(x), brute, rtol=0, atol=1e-12)


def off_the_edge(rng: np.random.Generator, masses: np.ndarray, low: float, high: float) -> float:
    """A top_p in [low, high) at least KNIFE_EDGE from every mass in `masses`."""
    for _ in range(1000):
        top_p = float(rng.uniform(low, high))
        if np.min(np.abs(masses - top_p)) > KNIFE_EDGE:
            return top_p
    raise AssertionError("no top_p off the knife edge")


_filter = jax.jit(filter_logits, static_argnames="top_k")
_reference = jax.jit(sorted_reference, static_argnames="top_k")
_cutoff = jax.jit(nucleus_cutoff, static_argnames="digit_bits")


def _case(rng: np.random.Generator, index: int) -> tuple[np.ndarray, float, int]:
    """Logits of one random case: shapes, scales, ties (bf16-rounded or small integers)."""
    shape = [(3, 50), (2, 3, 257), (1, 1000)][index % 3]
    logits = rng.normal(size=shape).astype(np.float32) * rng.choice([0.3, 2.0, 8.0])
    if index % 3 == 1:  # bf16-rounded: many exact ties
        logits = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    if index % 7 == 3:  # a handful of values only
        logits = rng.integers(-3, 3, size=shape).astype(np.float32)
    top_k = 6 if index % 4 == 2 else 0
    return logits, float(rng.choice([0.3, 0.7, 1.0, 1.6])), top_k


@pytest.mark.parametrize("top_p_range", [(0.05, 0.95), (1e-7, 1e-3), (0.999, 0.99999)],
                         ids=["middle", "tiny", "near_one"])
def test_filter_equals_the_sort_based_filter(top_p_range):
    rng = np.random.default_rng(sum(map(ord, str(top_p_range))))
    kept_counts = []
    for index in range(24):
        logits, temperature, top_k = _case(rng, index)
        scaled = np.asarray(_filter(logits, temperature, top_k=top_k))  # top_p = 1: no cut
        finite = np.isfinite(scaled)
        masses = mass_above(scaled)
        top_p = off_the_edge(rng, masses[finite], *top_p_range)
        got = np.asarray(_filter(logits, temperature, top_k=top_k, top_p=top_p))
        expected = np.where(finite & (masses < top_p), scaled, -np.inf)
        np.testing.assert_array_equal(got, expected, err_msg=f"case {index}")
        np.testing.assert_array_equal(
            got, np.asarray(_reference(logits, temperature, top_k, top_p)))
        kept_counts.append(np.isfinite(got).sum(axis=-1))
    kept_counts = np.concatenate([k.ravel() for k in kept_counts])
    if top_p_range[1] <= 1e-3:  # only the top value (all its ties) is left
        assert kept_counts.min() >= 1
    else:  # the cut is not trivial: some rows keep several tokens and some lose tokens
        assert kept_counts.max() > 1


@pytest.mark.parametrize("digit_bits", [2, 16])  # 8 and 4: the defaults, tested above and below
def test_other_digit_widths_find_the_same_cutoff(digit_bits):
    rng = np.random.default_rng(digit_bits)
    for index in range(6):
        logits, temperature, _ = _case(rng, index)
        scaled = jnp.asarray(logits) / temperature
        masses = mass_above(np.asarray(scaled))
        top_p = off_the_edge(rng, masses, 0.05, 0.99)
        key = _order_key(scaled)
        cutoff = _cutoff(scaled, key, top_p, digit_bits=digit_bits)
        kept = np.asarray(key >= cutoff)
        np.testing.assert_array_equal(kept, masses < top_p, err_msg=f"case {index}")
        # The cutoff is the key of a kept token (the lowest), not a key between tokens.
        assert np.all(np.any(np.asarray(key) == np.asarray(cutoff), axis=-1))


def test_wide_rows_take_the_narrow_digits():
    """Over WIDE_DIGITS_MAX_LOGITS logits the default digits are 4 bits: the same filter."""
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(5, 120_000)) * 4).astype(np.float32)
    logits = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert logits.size > WIDE_DIGITS_MAX_LOGITS
    masses = mass_above(logits)
    top_p = off_the_edge(rng, masses, 0.3, 0.9)
    got = np.asarray(_filter(logits, 1.0, top_p=top_p))
    np.testing.assert_array_equal(got, np.where(masses < top_p, logits, -np.inf))


def test_a_zero_of_either_sign_is_one_value():
    scaled = jnp.array([[2.0, 0.0, -0.0, -1.0, 0.0]])
    key = _order_key(scaled)
    assert int(key[0, 1]) == int(key[0, 2])
    assert np.all(np.diff(np.asarray(_order_key(jnp.array([-jnp.inf, -3.0, -1e-30, 0.0, 1e-30,
                                                               5.0, jnp.inf])))) > 0)
    # p(2) = 0.60; the tie at 0 (three tokens) is kept or dropped as one.
    got = np.asarray(_filter(scaled, 1.0, top_p=0.7))
    np.testing.assert_array_equal(np.isfinite(got), [[True, True, True, False, True]])


def test_a_token_whose_mass_above_equals_top_p_is_cut():
    """Exactly on the edge (in float32: top_p * total == the mass above), the token goes: kept
    means the mass above is strictly short of top_p."""
    for x in np.linspace(-0.3, -2.0, 50, dtype=np.float32):
        total = np.float32(1) + np.float32(jnp.exp(x))  # the weights exp(x - max) are 1, e^x
        top_p = np.float32(1) / total
        if top_p * total == np.float32(1):
            break
    else:
        raise AssertionError("no exact edge found")
    got = np.asarray(_filter(np.array([0.0, x], np.float32), 1.0, top_p=top_p))
    np.testing.assert_array_equal(got, [0.0, -np.inf])
    just_above = np.nextafter(top_p, np.float32(1))
    got = np.asarray(_filter(np.array([0.0, x], np.float32), 1.0, top_p=just_above))
    np.testing.assert_array_equal(got, [0.0, x])


def test_greedy_is_argmax_and_sampling_draws_from_the_filter():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(4, 6, 300)).astype(np.float32) * 3)
    sample = jax.jit(sample_tokens, static_argnames="top_k")
    for seed in range(2):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(sample(logits, key, 0.0, top_k=5, top_p=0.9),
                                      jnp.argmax(logits, axis=-1))
        filtered = filter_logits(logits, 0.8, top_k=5, top_p=0.9)
        np.testing.assert_array_equal(sample(logits, key, 0.8, top_k=5, top_p=0.9),
                                      jax.random.categorical(key, filtered, axis=-1))


@pytest.mark.slow
def test_vocab_sharded_filter_equals_one_device():
    """Under 8 CPU devices (tests/sampling_mesh_worker.py) the logits split over the vocabulary
    filter and sample as on one device, and the program gathers no vocabulary."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.sampling_mesh_worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["devices"] == 8 and len(report["cases"]) >= 6
    for case in report["cases"]:
        assert case["filtered_equal"] and case["tokens_equal"], case
    kept = [n for case in report["cases"] for n in case["kept"]]
    assert min(kept) == 1 and max(kept) > 100  # cuts to one token and to many
    # Collectives on the vocab-sharded program: small all-reduces only (and the categorical's
    # argmax pairs), each kind's total a fraction of the logits; the sort-based filter gathered
    # the whole logits (and all-to-all'ed them).
    collectives = report["collectives"]
    assert set(collectives) <= {"all-reduce", "all-gather"}, collectives
    assert all(nbytes < report["logits_bytes"] / 4 for _, nbytes in collectives.values()), \
        collectives
