"""Long context: YaRN and the Llama-4 query scaling past the original window, against transformers.

The fixture (tests/fixtures/long_context, made by tests/reference/make_long_golden.py) is a tiny
model whose original_max_position_embeddings is 32 and max_position_embeddings 256: a 200-token
prompt plus 56 new tokens fill the whole context and cross seven query-scaling steps.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.cache import KVCache
from tests.conftest import LONG_DIR
from tests.reference import np_forward

# float32: relative error (max |ours - golden| / max |golden|) below this (as test_model.py).
F32_RTOL = 1e-4


def _rel_err(ours: np.ndarray, golden: np.ndarray) -> float:
    return float(np.abs(ours - golden).max() / np.abs(golden).max())


def test_fixture_reaches_past_the_original_window(long_model, long_golden):
    c = long_model.config
    assert c.rope_type == "yarn" and c.rope_factor > 1 and c.llama_4_scaling_beta
    assert long_golden["input_ids"].shape[1] == c.max_position_embeddings
    assert long_golden["prompt"].size + long_golden["ar_tokens"].size == c.max_position_embeddings
    assert long_golden["prompt"].size > 6 * c.original_max_position_embeddings


def test_logits_past_original_window_match_transformers(long_model, long_golden):
    logits = np.asarray(long_model(jnp.asarray(long_golden["input_ids"])))
    assert _rel_err(logits, long_golden["logits_f32"]) < F32_RTOL
    late = slice(long_golden["prompt"].size, None)  # the positions generation reaches
    assert _rel_err(logits[:, late], long_golden["logits_f32"][:, late]) < F32_RTOL


@pytest.mark.parametrize("field,value", [("llama_4_scaling_beta", 0.0), ("factor", 1.0),
                                         ("beta_slow", 1.0)])
def test_golden_detects_a_wrong_scaling(long_golden, field, value):
    """The fixture can fail: an independent forward with one scaling field changed misses it.

    llama_4_scaling_beta 0: no query scaling; factor 1: plain RoPE; beta_slow 1: a YaRN ramp
    that starts at another dimension.
    """
    config, weights = np_forward.load_released(LONG_DIR)
    ids = long_golden["input_ids"][0]
    causal = np.tril(np.ones((ids.size, ids.size), bool))
    assert _rel_err(np_forward.forward(config, weights, ids, causal),
                    long_golden["logits_f32"][0]) < F32_RTOL
    wrong = json.loads(json.dumps(config))
    wrong["rope_parameters"][field] = value
    assert _rel_err(np_forward.forward(wrong, weights, ids, causal),
                    long_golden["logits_f32"][0]) > 30 * F32_RTOL


@pytest.mark.parametrize("block", [1, 8, 24])
def test_cached_prefill_then_blocks_match_transformers(long_model, long_golden, block):
    """A 200-token prefill into the cache, then the rest of the context in causal blocks."""
    ids = jnp.asarray(long_golden["input_ids"])
    prompt_len, total = long_golden["prompt"].size, ids.shape[1]
    c = long_model.config
    cache = KVCache.empty(num_layers=c.num_hidden_layers, batch=1, capacity=total,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          dtype=jnp.float32)
    hidden, block_kv = long_model.forward(ids[:, :prompt_len], None, causal=True)
    pieces = [np.asarray(long_model.logits(hidden))]
    cache = cache.write(block_kv, cache.lengths).with_lengths(jnp.array([prompt_len]))
    for start in range(prompt_len, total, block):
        size = min(block, total - start)
        hidden, block_kv = long_model.forward(ids[:, start:start + size], cache, causal=True)
        cache = cache.write(block_kv, cache.lengths).advance(jnp.array([size]))
        pieces.append(np.asarray(long_model.logits(hidden)))
    cached = np.concatenate(pieces, axis=1)
    assert _rel_err(cached, long_golden["logits_f32"]) < F32_RTOL
    late = slice(prompt_len, None)
    assert _rel_err(cached[:, late], long_golden["logits_f32"][:, late]) < F32_RTOL


@pytest.mark.parametrize("mode", nld_jax.MODES)
def test_generate_fills_the_context_as_transformers(long_model, long_golden, mode):
    """Prompt + new tokens = max_position_embeddings: greedy tokens equal the oracle's."""
    out = nld_jax.generate(long_model, [long_golden["prompt"].tolist()], mode=mode,
                           max_new_tokens=long_golden["ar_tokens"].size, block_size=8,
                           eos_token_ids=[int(long_golden["eos_token_id"])])
    if mode == "diffusion":
        assert out.tokens[0] == long_golden["diffusion_tokens"].tolist()
        assert out.num_forwards == int(long_golden["diffusion_forwards"])
    else:
        # Greedy self-speculation emits exactly the greedy AR tokens.
        assert out.tokens[0] == long_golden["ar_tokens"].tolist()


@pytest.mark.parametrize("mode,new_tokens", [("ar", 57), ("self_spec", 57), ("diffusion", 57)])
def test_generate_rejects_past_max_position_embeddings(long_model, long_golden, mode, new_tokens):
    with pytest.raises(ValueError, match=r"config\.max_position_embeddings=256"):
        nld_jax.generate(long_model, [long_golden["prompt"].tolist()], mode=mode,
                         max_new_tokens=new_tokens, block_size=8)


def test_generate_rejects_diffusion_rounded_past_the_context(long_model, long_golden):
    """Diffusion emits whole blocks: 50 new tokens at block 8 need 56 positions (fits), at
    block 16 they need 64 (does not)."""
    prompt = [long_golden["prompt"].tolist()]
    eos = [int(long_golden["eos_token_id"])]
    out = nld_jax.generate(long_model, prompt, mode="diffusion", max_new_tokens=50, block_size=8,
                           eos_token_ids=eos)
    assert len(out.tokens[0]) == 56
    with pytest.raises(ValueError, match=r"needs 264 positions"):
        nld_jax.generate(long_model, prompt, mode="diffusion", max_new_tokens=50, block_size=16)
