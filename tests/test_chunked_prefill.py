"""Chunked prefill: long prompts go through the cached forward a chunk at a time.

Correctness: every mode gives the tokens of the one-forward prefill (and of the transformers
golden) whatever the chunk. Memory: a 32k-token prompt prefills and decodes in every mode within
a bound stated from first principles, checked on the compiled program's memory analysis.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nld_jax
from nld_jax.cache import KVCache
from nld_jax.config import NLDConfig
from nld_jax.decode import REGISTRY
from nld_jax.decode.common import Context, Options, Sampler
from nld_jax.decode.prefill import prefill
from nld_jax.kernels import Kernels

generate_module = importlib.import_module("nld_jax.generate")

MIB = 1 << 20
F32 = 4


@pytest.mark.parametrize("mode", nld_jax.MODES)
@pytest.mark.parametrize("chunk", [48])
def test_chunked_equals_transformers_and_one_forward(long_model, long_golden, mode, chunk):
    """A 200-token prompt (5 chunks of 48, the prompt width padded to 288) and a 77-token row."""
    prompts = [long_golden["prompt"].tolist(), long_golden["prompt"][:77].tolist()]
    kwargs = dict(mode=mode, max_new_tokens=long_golden["ar_tokens"].size, block_size=8,
                  eos_token_ids=[int(long_golden["eos_token_id"])])
    chunked = nld_jax.generate(long_model, prompts, prefill_chunk=chunk, **kwargs)
    whole = nld_jax.generate(long_model, prompts, prefill_chunk=256, **kwargs)
    assert chunked.tokens == whole.tokens
    assert chunked.num_forwards == whole.num_forwards
    expected = long_golden["diffusion_tokens" if mode == "diffusion" else "ar_tokens"]
    assert chunked.tokens[0] == expected.tolist()


@pytest.mark.parametrize("chunk", [64, 48, 7])
def test_chunked_prefill_logits_and_cache_equal_one_forward(long_model, long_golden, chunk):
    """Last-token logits and every valid cache slot, chunked vs one forward, ragged rows; and
    the logits equal the transformers golden at each row's last prompt token."""
    config = long_model.config
    lengths = np.array([200, 77, 130], np.int32)
    width = -(-256 // chunk) * chunk
    prompts = np.zeros((3, width), np.int32)
    for row, n in enumerate(lengths):
        prompts[row, :n] = long_golden["input_ids"][0, :n]
    sampler = Sampler(temperature=jnp.float32(0), top_p=jnp.float32(1))
    ctx = Context(model=long_model, sampler=sampler,
                  eos_ids=jnp.asarray(config.eos_token_ids, jnp.int32),
                  settings=REGISTRY["ar"].settings.from_options(config, Options()),
                  kernels=Kernels())

    def run(prompts, lengths, chunk):
        cache = KVCache.empty(num_layers=config.num_hidden_layers, batch=3, capacity=width + 64,
                              num_kv_heads=config.num_key_value_heads,
                              head_dim=config.head_dim, dtype=long_model.dtype)
        last, cache = prefill(ctx, prompts, lengths, cache, chunk)
        return long_model.logits(last)[:, 0], cache

    args = jnp.asarray(prompts), jnp.asarray(lengths)
    whole_logits, whole = jax.jit(lambda p, n: run(p, n, None))(*args)
    chunked_logits, chunked = jax.jit(lambda p, n: run(p, n, chunk))(*args)
    np.testing.assert_array_equal(chunked.lengths, lengths)
    np.testing.assert_allclose(chunked_logits, whole_logits, rtol=1e-5, atol=1e-5)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(chunked.k[:, row, :n], whole.k[:, row, :n], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(chunked.v[:, row, :n], whole.v[:, row, :n], rtol=1e-5,
                                   atol=1e-5)
        want = long_golden["logits_f32"][0, n - 1]
        assert np.abs(chunked_logits[row] - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("chunk", [0, -4, True, 2.5, "512"])
def test_bad_chunk_is_rejected(long_model, chunk):
    with pytest.raises((ValueError, TypeError), match="prefill_chunk"):
        nld_jax.generate(long_model, [[1, 2, 3]], prefill_chunk=chunk)


# ------------------------------------------------------------------------- a 32k-token prompt
LONG_PROMPT = 32768
CHUNK = 512
NEW_TOKENS = 8
# Small enough for CPU: one layer, one query and one KV head (the attention work of a 32k
# prefill is P x S x N x H whatever the width).
LONG_CONFIG = NLDConfig.preset("tiny", max_position_embeddings=2 * LONG_PROMPT,
                               num_hidden_layers=1, num_attention_heads=1,
                               num_key_value_heads=1, hidden_size=32, intermediate_size=64)


def _memory_bound(capacity: int, chunk: int) -> int:
    """Temp bytes a chunked prefill + decode may use, from first principles (float32, B = 1).

    - The KV cache, created inside the program: K and V of every layer, S slots.
    - One chunk's attention on the XLA path: float32 scores of C queries per head against the
      S cached and C block keys; at most three buffers of that size are live at once (scores,
      masked scores, probabilities). Decode steps attend with fewer queries (at most
      T(T+1) = 72 for quadratic self-speculation at block 8), so the prefill sets the peak.
    - Everything else is O(C x (D + F + V)) and the output buffers: under 16 MiB here.
    Without chunking the scores alone are P x P x N floats (4 GiB at 32k), far above this.
    """
    c = LONG_CONFIG
    cache = 2 * c.num_hidden_layers * capacity * c.num_key_value_heads * c.head_dim * F32
    scores = chunk * c.num_attention_heads * (capacity + chunk) * F32
    return cache + 3 * scores + 16 * MIB


class _Compiled(Exception):
    """Raised to stop generate() after compiling its program (nothing is run)."""


def _spy_on_program(monkeypatch: pytest.MonkeyPatch, run: bool = True) -> list[Any]:
    """generate()'s program goes through an explicit compile whose memory analysis and cache
    size are recorded (nothing is compiled twice); with run False it stops there."""
    program = generate_module._program
    seen: list[Any] = []

    def compile_and_run(*args: Any, static: Any, **kwargs: Any) -> Any:
        compiled = program.lower(*args, static=static, **kwargs).compile()
        seen.append((compiled.memory_analysis(), static.capacity))
        if not run:
            raise _Compiled
        return compiled(*args[1:], **kwargs)  # graphdef (first) is static

    monkeypatch.setattr(generate_module, "_program", compile_and_run)
    return seen


@pytest.fixture(scope="module")
def model_32k() -> nld_jax.NLDModel:
    return nld_jax.NLDModel(LONG_CONFIG, dtype="float32", rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("mode", nld_jax.MODES)
def test_32k_prompt_within_memory_bound(model_32k, mode, monkeypatch):
    seen = _spy_on_program(monkeypatch)
    prompt = np.random.default_rng(7).integers(0, LONG_CONFIG.vocab_size, LONG_PROMPT).tolist()
    out = nld_jax.generate(model_32k, [prompt], mode=mode, max_new_tokens=NEW_TOKENS,
                           block_size=8, prefill_chunk=CHUNK)
    assert 1 <= len(out.tokens[0]) <= NEW_TOKENS  # fewer only after an EOS
    (analysis, capacity), = seen
    assert capacity >= LONG_PROMPT + NEW_TOKENS
    bound = _memory_bound(capacity, CHUNK)
    assert analysis.temp_size_in_bytes <= bound, (analysis.temp_size_in_bytes, bound)
    # The bound is O(chunk x S): far below what one forward over the prompt needs.
    assert bound < LONG_PROMPT * LONG_PROMPT * F32 / 8


def test_one_forward_prefill_exceeds_the_bound(model_32k, monkeypatch):
    """The check can fail: the same 32k request prefilled in one forward breaks the bound."""
    seen = _spy_on_program(monkeypatch, run=False)
    # generate() would refuse the call up front if the host lacks the memory it needs to run.
    monkeypatch.setattr(generate_module.limits, "check_memory", lambda *args: None)
    with pytest.raises(_Compiled):
        nld_jax.generate(model_32k, [[1] * LONG_PROMPT], max_new_tokens=NEW_TOKENS,
                         prefill_chunk=LONG_PROMPT)
    (analysis, capacity), = seen
    assert analysis.temp_size_in_bytes > 10 * _memory_bound(capacity, CHUNK)
