"""The bundled trained model: diffusion and self-speculation give correct text in fewer forwards.

Measured when the model was made (examples/train_tiny.py, 200 held-out prompts): AR accuracy
1.00; diffusion 0.98-1.00 at about 3 tokens per forward; self-spec equal to AR with about 7
of 7 drafts accepted per cycle. The thresholds below leave a margin under those figures.
"""

from __future__ import annotations

import numpy as np
import pytest

import nld_jax
from nld_jax import tiny

AR_MIN_ACCURACY = 0.95
DIFFUSION_TOLERANCE = 0.05  # diffusion accuracy >= AR accuracy - this
NUM_PROMPTS = 64


@pytest.fixture(scope="module")
def model():
    return nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")


@pytest.fixture(scope="module")
def held_out():
    # Training drew from seeds 0 and 1; these prompts come from another stream.
    rng = np.random.default_rng(20261123)
    return [tiny.make_example(rng) for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def ar_output(model, held_out):
    return nld_jax.generate(model, [p for p, _ in held_out], mode="ar", max_new_tokens=16)


def _accuracy(out, held_out) -> float:
    return float(np.mean([o == a for o, (_, a) in zip(out.tokens, held_out, strict=True)]))


def test_bundled_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "linear_spec_lora/adapter_model.safetensors"):
        assert (tiny.TINY_MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in tiny.TINY_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 10 * 2**20


def test_ar_solves_held_out_prompts(ar_output, held_out):
    assert _accuracy(ar_output, held_out) >= AR_MIN_ACCURACY


def test_diffusion_is_as_accurate_in_fewer_forwards(model, ar_output, held_out):
    out = nld_jax.generate(model, [p for p, _ in held_out], mode="diffusion", max_new_tokens=16)
    assert _accuracy(out, held_out) >= _accuracy(ar_output, held_out) - DIFFUSION_TOLERANCE
    assert out.stats["tokens_per_forward"] >= 2.0
    assert ar_output.stats["tokens_per_forward"] < 1.3


def test_self_spec_equals_ar_with_long_acceptances(model, ar_output, held_out):
    out = nld_jax.generate(model, [p for p, _ in held_out], mode="self_spec", max_new_tokens=16)
    assert out.tokens == ar_output.tokens
    assert out.stats["mean_accepted"] >= 2.0
    assert out.stats["tokens_per_forward"] >= 2.0


def test_quadratic_self_spec_equals_ar_in_fewer_forwards(model, ar_output, held_out):
    """One forward a cycle: the same text as AR in fewer forwards than LinearSpec (whose drafts
    are as good here), which also shows each cycle drafts from the right group. Block 4: the
    answers take several cycles, so the groups' drafts (not only the bootstrap's) are used."""
    prompts = [p for p, _ in held_out]
    linear = nld_jax.generate(model, prompts, mode="self_spec", max_new_tokens=16, block_size=4)
    out = nld_jax.generate(model, prompts, mode="self_spec_quadratic", max_new_tokens=16,
                           block_size=4)
    assert out.tokens == ar_output.tokens
    assert out.stats["mean_accepted"] >= 2.0
    assert out.stats["tokens_per_forward"] > linear.stats["tokens_per_forward"]


def test_tokenizer_round_trip():
    tokenizer = nld_jax.load_tokenizer(tiny.TINY_MODEL_DIR)
    text = "<s> reverse 3 1 4 1 5 ="
    ids = tokenizer.encode(text)
    assert ids == tiny.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.eos_token_id == tiny.EOS
