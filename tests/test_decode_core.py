"""The decoding-mode interface: every mode through one path, a new mode in one registry line,
and rows replaced between program calls decoding exactly as a fresh run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax import decode, tiny
from nld_jax.cache import KVCache
from nld_jax.decode import ar
from nld_jax.decode.common import Context, Mode, Options, Sampler, replace_rows, run_loop, start
from nld_jax.kernels import Kernels

PROMPT_SLOTS, OUT_LEN, CAPACITY = 16, 64, 192


@pytest.fixture(scope="module")
def model():
    return nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [p for p, _ in (tiny.make_example(rng) for _ in range(n))]


@pytest.mark.parametrize("name", list(decode.REGISTRY))
def test_replaced_row_decodes_as_a_fresh_run(model, name):
    """A finished row's slot given to a new prompt between program calls decodes that prompt
    exactly as a fresh run does, and the other row keeps its output."""
    mode = decode.REGISTRY[name]
    config = model.config
    ctx = Context(model=model, sampler=Sampler(temperature=jnp.float32(0), top_p=jnp.float32(1)),
                  eos_ids=jnp.asarray(config.eos_token_ids, jnp.int32),
                  settings=mode.settings.from_options(config, Options()), kernels=Kernels())

    @jax.jit
    def begin(prompts, lengths):
        cache = KVCache.empty(num_layers=config.num_hidden_layers, batch=prompts.shape[0],
                              capacity=CAPACITY, num_kv_heads=config.num_key_value_heads,
                              head_dim=config.head_dim, dtype=model.dtype)
        return start(ctx, mode, prompts, lengths, cache, OUT_LEN, jnp.int32(24),
                     jax.random.key(0))

    run = jax.jit(lambda state: run_loop(ctx, mode, state, None))

    def fresh(prompts):
        padded = np.zeros((len(prompts), PROMPT_SLOTS), np.int32)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = p
        return begin(jnp.asarray(padded), jnp.asarray([len(p) for p in prompts], jnp.int32))

    a, b, c = _prompts(3, seed=11)
    first = run(fresh([a, b]))
    assert bool(first.finished.all())
    continued = run(replace_rows(first, jnp.asarray([0]), fresh([c])))
    want = run(fresh([c, b]))

    def row(state, i):
        return state.tokens[i, :state.num_tokens[i]].tolist()

    assert row(continued, 0) == row(want, 0) and row(want, 0) != row(first, 0)
    assert row(continued, 1) == row(first, 1)
    assert int(continued.cache.lengths[0]) == int(want.cache.lengths[0])


def test_a_new_mode_is_one_registry_line(model, monkeypatch):
    """generate() runs whatever Mode the registry holds, without knowing it by name."""
    echo = Mode(name="ar_again", settings=ar.Settings, init=ar.init, step=ar.step,
                stats=lambda final: {"rows": int(final.finished.size)})
    monkeypatch.setitem(decode.REGISTRY, echo.name, echo)
    prompts = _prompts(2, seed=5)
    got = nld_jax.generate(model, prompts, mode="ar_again", max_new_tokens=12)
    want = nld_jax.generate(model, prompts, mode="ar", max_new_tokens=12)
    assert got.tokens == want.tokens and got.stats["rows"] == 2


def test_settings_say_their_room():
    config = nld_jax.NLDConfig.preset("tiny")
    rooms = {name: mode.settings.from_options(config, Options(block_size=4)).room()
             for name, mode in decode.REGISTRY.items()}
    assert dataclasses.astuple(rooms["ar"]) == (1, 0, False)
    assert dataclasses.astuple(rooms["diffusion"]) == (4, 4, True)
    assert dataclasses.astuple(rooms["self_spec"]) == (4, 4, False)
    assert dataclasses.astuple(rooms["self_spec_quadratic"]) == (4, 20, False)
