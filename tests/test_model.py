"""The network against the transformers golden logits and an independent NumPy forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.cache import KVCache
from tests.reference import np_forward

# float32: relative error (max |ours - golden| / max |golden|) below this.
F32_RTOL = 1e-4
# bfloat16: our bf16 logits may differ from the float32 golden by at most twice what
# transformers' own bf16 run differs from it (both round weights-times-activations to 8 bits of
# mantissa, in a different order), measured per fixture as max|logits_bf16 - logits_f32|.
BF16_FACTOR = 2.0


def _rel_err(ours: np.ndarray, golden: np.ndarray) -> float:
    return float(np.abs(ours - golden).max() / np.abs(golden).max())


def test_f32_logits_match_transformers(golden_case):
    path, golden = golden_case
    model = nld_jax.load_model(path, dtype="float32", lora=False)
    logits = np.asarray(model(jnp.asarray(golden["input_ids"])))
    assert logits.dtype == np.float32
    assert _rel_err(logits, golden["logits_f32"]) < F32_RTOL


def test_bf16_logits_within_bound(golden_case):
    path, golden = golden_case
    model = nld_jax.load_model(path, dtype="bfloat16", lora=False)
    logits = np.asarray(model(jnp.asarray(golden["input_ids"])))
    hf_bf16_error = np.abs(golden["logits_bf16"] - golden["logits_f32"]).max()
    assert np.abs(logits - golden["logits_f32"]).max() <= BF16_FACTOR * hf_bf16_error
    # And not trivially: the bound is far below the logits' own spread.
    assert hf_bf16_error < 0.2 * golden["logits_f32"].std()


def test_numpy_reference_matches_transformers(golden_case):
    """The independent reference used below is itself right on the causal pattern."""
    path, golden = golden_case
    config, weights = np_forward.load_released(path)
    ids = golden["input_ids"][0]
    causal = np.tril(np.ones((len(ids), len(ids)), bool))
    ref = np_forward.forward(config, weights, ids, causal)
    assert _rel_err(ref, golden["logits_f32"][0]) < F32_RTOL


def test_bidirectional_matches_independent_masked_computation(golden_case):
    path, golden = golden_case
    model = nld_jax.load_model(path, dtype="float32", lora=False)
    config, weights = np_forward.load_released(path)
    ids = golden["input_ids"][:, :48]
    ours = np.asarray(model(jnp.asarray(ids), causal=False))
    full = np.ones((ids.shape[1], ids.shape[1]), bool)
    for row in range(ids.shape[0]):
        ref = np_forward.forward(config, weights, ids[row], full)
        assert _rel_err(ours[row], ref) < F32_RTOL
    # The pattern matters: the causal logits are far from these.
    causal = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(causal - ours).max() > 1e-2


@pytest.mark.parametrize("splits", [(80,), (1, 79), (37, 1, 1, 41), (16, 32, 32), (50, 30)])
def test_cached_block_forward_equals_full_forward(golden_case, splits):
    path, golden = golden_case
    model = nld_jax.load_model(path, dtype="float32", lora=False)
    ids = jnp.asarray(golden["input_ids"])
    full = np.asarray(model(ids))
    c = model.config
    cache = KVCache.empty(num_layers=c.num_hidden_layers, batch=2, capacity=96,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          dtype=jnp.float32)
    pieces, start = [], 0
    for size in splits:
        block = ids[:, start:start + size]
        # A bidirectional pass first, not written: the next block must not see it.
        model.forward(block, cache, causal=False)
        hidden, block_kv = model.forward(block, cache, causal=True)
        cache = cache.write(block_kv, cache.lengths).advance(jnp.full((2,), size))
        pieces.append(np.asarray(model.logits(hidden)))
        start += size
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_block_forward_bidirectional_with_prefix(golden_case):
    """A bidirectional block after a causal prefix = the independent reference with that mask."""
    path, golden = golden_case
    model = nld_jax.load_model(path, dtype="float32", lora=False)
    config, weights = np_forward.load_released(path)
    ids = golden["input_ids"][:1, :40]
    prefix, block = 32, 8
    mask = np.tril(np.ones((40, 40), bool))
    mask[prefix:, prefix:] = True
    ref = np_forward.forward(config, weights, ids[0], mask)[prefix:]
    c = model.config
    cache = KVCache.empty(num_layers=c.num_hidden_layers, batch=1, capacity=64,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          dtype=jnp.float32)
    _, block_kv = model.forward(jnp.asarray(ids[:, :prefix]), cache, causal=True)
    cache = cache.write(block_kv, cache.lengths).advance(jnp.array([prefix]))
    # One jitted program, the pattern chosen by a traced flag.
    run = jax.jit(lambda toks, cache, causal: model.logits(
        model.forward(toks, cache, causal=causal)[0]))
    bidir = np.asarray(run(jnp.asarray(ids[:, prefix:]), cache, jnp.bool_(False)))[0]
    causal = np.asarray(run(jnp.asarray(ids[:, prefix:]), cache, jnp.bool_(True)))[0]
    assert _rel_err(bidir, ref) < F32_RTOL
    np.testing.assert_allclose(causal, golden["logits_f32"][0, prefix:40], rtol=1e-4, atol=1e-5)
    assert block == bidir.shape[0]
