"""generate(stream=...): host callbacks from inside the one program; text prompts via the
tokenizer that load_model attaches."""

from __future__ import annotations

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nld_jax
from nld_jax import tiny
from nld_jax.decode.common import Stream
from nld_jax.generate import _program
from tests.conftest import GOLDEN_DIR

# The module (the package's `generate` attribute is the function).
generate_module = importlib.import_module("nld_jax.generate")
PROMPTS = ["<s> sort 3 9 1 4 =", "<s> reverse 1 2 3 4 5 6 7 8 9 =", "<s> sort 7 7 0 2 5 1 ="]
ANSWERS = ["1 3 4 9", "9 8 7 6 5 4 3 2 1", "0 1 2 5 7 7"]


@pytest.fixture(scope="module")
def model():
    return nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")


def _streamed(model, mode: str, **kwargs) -> tuple[nld_jax.GenerationOutput, list]:
    calls: list[list[list[int]]] = []
    out = nld_jax.generate(model, PROMPTS, mode=mode, max_new_tokens=16, stream=calls.append,
                           **kwargs)
    return out, calls


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec", "self_spec_quadratic"])
def test_streamed_tokens_equal_the_output(model, mode):
    plain = nld_jax.generate(model, PROMPTS, mode=mode, max_new_tokens=16)
    out, calls = _streamed(model, mode)
    assert out.tokens == plain.tokens and out.stats == plain.stats
    assert out.texts == ANSWERS
    for row in range(len(PROMPTS)):
        assert sum((call[row] for call in calls), []) == out.tokens[row]
    # Once when the loop starts, then after every step: a token, a block, a cycle.
    block = model.config.block_size
    steps = {"ar": out.num_forwards, "self_spec": out.num_forwards // 2,
             "self_spec_quadratic": out.num_forwards - 1,
             "diffusion": max(-(-len(t) // block) for t in out.tokens)}[mode]
    assert len(calls) == steps + 1
    if mode == "ar":
        assert all(len(call[0]) <= 1 for call in calls)
    else:  # whole blocks or cycles at a time
        assert max(len(call[1]) for call in calls) >= 4


def test_sampled_stream_equals_the_output(model):
    out, calls = _streamed(model, "self_spec", temperature=1.0, seed=3)
    for row in range(len(PROMPTS)):
        assert sum((call[row] for call in calls), []) == out.tokens[row]


def test_no_callback_without_streaming(model, monkeypatch):
    lowered: dict[bool, str] = {}
    program = generate_module._program

    def spy(*args, **kwargs):
        lowered[any(isinstance(a, Stream) for a in args)] = program.lower(*args, **kwargs).as_text()
        return program(*args, **kwargs)

    monkeypatch.setattr(generate_module, "_program", spy)
    nld_jax.generate(model, PROMPTS[:1], mode="diffusion", max_new_tokens=8)
    nld_jax.generate(model, PROMPTS[:1], mode="diffusion", max_new_tokens=8, stream=print)
    assert "callback" not in lowered[False]
    assert "callback" in lowered[True]


def test_each_call_reuses_the_streaming_program(model):
    _streamed(model, "ar")
    before = _program._cache_size()
    for _ in range(2):  # a new callback each call: the stream id is traced, not static
        _streamed(model, "ar")
    assert _program._cache_size() == before


def test_callback_errors_surface_after_the_program(model):
    def broken(new_tokens):
        raise RuntimeError("display went away")

    with pytest.raises(RuntimeError, match="display went away"):
        nld_jax.generate(model, PROMPTS, mode="self_spec", max_new_tokens=16, stream=broken)
    assert nld_jax.generate(model, PROMPTS, mode="self_spec", max_new_tokens=16).texts == ANSWERS
    with pytest.raises(TypeError, match="stream must be a callable"):
        nld_jax.generate(model, PROMPTS, stream=3)


def test_text_prompts_need_the_attached_tokenizer(model):
    by_ids = nld_jax.generate(model, [tiny.encode(p) for p in PROMPTS], max_new_tokens=16)
    by_text = nld_jax.generate(model, PROMPTS, max_new_tokens=16)
    assert by_text.tokens == by_ids.tokens and by_text.texts == ANSWERS
    with pytest.raises(TypeError, match="pass a list of prompts"):
        nld_jax.generate(model, PROMPTS[0])
    bare = nld_jax.load_model(GOLDEN_DIR / "gqa4_theta1e6", dtype="float32")
    assert not hasattr(bare, "tokenizer")
    with pytest.raises(TypeError, match="no tokenizer is attached"):
        nld_jax.generate(bare, ["hello"])
    assert nld_jax.generate(bare, [[1, 2, 3]], max_new_tokens=2).texts is None


def test_tokenizer_survives_split_merge_and_jit(model):
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    assert merged.tokenizer is model.tokenizer
    ids = jnp.asarray([tiny.encode(PROMPTS[0])])
    logits = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(logits, model(ids), rtol=1e-5, atol=1e-5)  # fusion rounding
    # Two loads of one checkpoint carry equal tokenizers, so they share compiled programs.
    again = nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")
    assert again.tokenizer == model.tokenizer and again.tokenizer is not model.tokenizer
    nld_jax.generate(model, PROMPTS, mode="ar", max_new_tokens=16)
    before = _program._cache_size()
    nld_jax.generate(again, PROMPTS, mode="ar", max_new_tokens=16)
    assert _program._cache_size() == before
