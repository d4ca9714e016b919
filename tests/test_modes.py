"""Diffusion and self-spec options, invariants, argument errors and compile-once behaviour."""

from __future__ import annotations

import numpy as np
import pytest

import nld_jax
from nld_jax import tiny
from nld_jax.generate import _program
from tests.conftest import GOLDEN_DIR


@pytest.fixture(scope="module")
def random_model():
    return nld_jax.load_model(GOLDEN_DIR / "gqa4_theta1e6", dtype="float32", lora=False)


@pytest.fixture(scope="module")
def trained():
    return nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")


def _prompts(n: int, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [p for p, _ in (tiny.make_example(rng) for _ in range(n))]


@pytest.mark.parametrize("block_size", [8, 32])
def test_block_sizes_8_and_32(random_model, block_size):
    prompts = [[5, 6, 7], list(range(1, 30))]
    out = nld_jax.generate(random_model, prompts, mode="diffusion", block_size=block_size,
                           max_new_tokens=2 * block_size, eos_token_ids=[127])
    rows_without_eos = [t for t in out.tokens if 127 not in t]
    assert all(len(t) == 2 * block_size for t in rows_without_eos)
    assert out.stats["num_blocks"] == 2 * len(prompts)
    # Each block: its denoise steps plus one commit forward.
    steps = out.stats["denoise_steps_per_block"] * out.stats["num_blocks"]
    assert out.stats["row_forwards"] == steps + out.stats["num_blocks"]
    spec = nld_jax.generate(random_model, prompts, mode="self_spec", block_size=block_size,
                            max_new_tokens=2 * block_size, eos_token_ids=[127])
    ar = nld_jax.generate(random_model, prompts, mode="ar", max_new_tokens=2 * block_size,
                          eos_token_ids=[127])
    assert spec.tokens == ar.tokens


def test_budget_rounds_up_to_whole_blocks(trained):
    out = nld_jax.generate(trained, [[1, 5, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 6]], mode="diffusion",
                           max_new_tokens=3, eos_token_ids=[0])
    assert len(out.tokens[0]) == trained.config.block_size


def test_self_spec_block_32_equals_ar_on_trained_model(trained):
    prompts = _prompts(16)
    ar = nld_jax.generate(trained, prompts, mode="ar", max_new_tokens=12)
    spec = nld_jax.generate(trained, prompts, mode="self_spec", max_new_tokens=12, block_size=32)
    assert spec.tokens == ar.tokens
    assert spec.stats["mean_accepted"] >= 2


def test_all_mask_init_and_schedule_options(trained):
    rng = np.random.default_rng(3)
    examples = [tiny.make_example(rng) for _ in range(16)]
    prompts = [p for p, _ in examples]
    for kwargs in (dict(all_mask_init=True), dict(threshold=None, denoise_steps=4),
                   dict(threshold=0.5)):
        out = nld_jax.generate(trained, prompts, mode="diffusion", max_new_tokens=16, **kwargs)
        correct = np.mean([o == a for o, (_, a) in zip(out.tokens, examples, strict=True)])
        assert correct >= 0.75, (kwargs, correct)
    schedule = nld_jax.generate(trained, prompts, mode="diffusion", max_new_tokens=16,
                                threshold=None, denoise_steps=2)
    assert schedule.stats["denoise_steps_per_block"] <= 2


def test_sampling_modes_run_and_are_seeded(trained):
    prompts = _prompts(8)
    for mode in ("diffusion", "self_spec"):
        a = nld_jax.generate(trained, prompts, mode=mode, max_new_tokens=16, temperature=0.8,
                             seed=1)
        b = nld_jax.generate(trained, prompts, mode=mode, max_new_tokens=16, temperature=0.8,
                             seed=1)
        assert a.tokens == b.tokens
        assert all(1 <= len(t) <= 16 for t in a.tokens)


def test_each_mode_compiles_once_per_bucket(trained):
    for mode in ("diffusion", "self_spec", "self_spec_quadratic"):
        nld_jax.generate(trained, _prompts(4, seed=1), mode=mode, max_new_tokens=12)
        before = _program._cache_size()
        nld_jax.generate(trained, _prompts(4, seed=2), mode=mode, max_new_tokens=16,
                         temperature=0.5, eos_token_ids=[2, 5])
        nld_jax.generate(trained, _prompts(4, seed=3), mode=mode, max_new_tokens=9,
                         eos_token_ids=[4, 6])
        if mode == "diffusion":
            nld_jax.generate(trained, _prompts(4, seed=4), mode=mode, max_new_tokens=9,
                             threshold=0.7, denoise_steps=3)
        assert _program._cache_size() == before, mode


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="diffusion", block_size=1), "block_size=1"),
    (dict(mode="self_spec", block_size=0), "block_size=0"),
    (dict(mode="self_spec_quadratic", block_size=1), "block_size=1"),
    (dict(mode="diffusion", block_size=2.5), "block_size=2.5"),
    (dict(mode="diffusion", threshold=0.0), "threshold=0.0"),
    (dict(mode="diffusion", threshold=1.5), "threshold=1.5"),
    (dict(mode="diffusion", denoise_steps=0), "denoise_steps=0"),
    (dict(mode="diffusion", block_size=4, denoise_steps=5), "denoise_steps=5"),
    (dict(mode="diffusion", temperature=-0.1), "temperature=-0.1"),
    (dict(mode="self_spec", temperature=-2.0), "temperature=-2.0"),
    (dict(mode="self_spec", accept_rule="greedy"), "accept_rule='greedy'"),
    (dict(mode="speculative"), "unknown mode='speculative'"),
])
def test_bad_arguments(random_model, kwargs, message):
    with pytest.raises((ValueError, TypeError)) as info:  # TypeError: a value of a wrong type
        nld_jax.generate(random_model, [[1, 2, 3]], max_new_tokens=8, **kwargs)
    assert message in str(info.value)
