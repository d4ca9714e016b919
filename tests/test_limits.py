"""nld_jax.checks (named argument errors) and nld_jax.limits (the memory estimate and check)."""

from __future__ import annotations

import dataclasses
import importlib
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nld_jax
from nld_jax import checks, limits, tiny
from nld_jax.config import NLDConfig
from nld_jax.model import NLDModel


@pytest.mark.parametrize("value, error, message", [
    (2**70, ValueError, "seed=1180591620717411303424 must be an integer in [-5, 9]"),
    (1.5, TypeError, "seed=1.5 must be an integer, got float"),
    (True, TypeError, "seed=True must be an integer, got bool"),
    ("3", TypeError, "seed='3' must be an integer, got str"),
    (10, ValueError, "must be an integer in [-5, 9]"),
])
def test_integer_errors_name_the_argument(value, error, message):
    with pytest.raises(error) as info:
        checks.integer("seed", value, low=-5, high=9)
    assert message in str(info.value)
    assert checks.integer("seed", np.int64(9), low=-5, high=9) == 9
    assert type(checks.integer("seed", np.int64(9))) is int


@pytest.mark.parametrize("value, error, message", [
    ("1", TypeError, "temperature='1' must be a real number, got str"),
    (float("nan"), ValueError, "temperature=nan must be finite"),
    (float("inf"), ValueError, "temperature=inf must be finite"),
    (None, TypeError, "temperature=None must be a real number"),
    (False, TypeError, "got bool"),
    (0.0, ValueError, "temperature=0.0 must be in (0.0, 1.0]"),
    (1.5, ValueError, "must be in (0.0, 1.0]"),
])
def test_real_errors_name_the_argument(value, error, message):
    with pytest.raises(error) as info:
        checks.real("temperature", value, low=0.0, high=1.0, low_open=True)
    assert message in str(info.value)
    assert checks.real("temperature", np.float32(0.5), low=0.0, high=1.0) == 0.5
    assert checks.real("temperature", 1, low=0.0, high=1.0) == 1.0


def _tiny_config() -> NLDConfig:
    return NLDConfig(vocab_size=len(tiny.VOCAB), hidden_size=128, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     intermediate_size=512, max_position_embeddings=512, bos_token_id=1,
                     eos_token_ids=(2,), mask_token_id=3, block_size=8)


def test_estimate_counts_the_cache_and_the_biggest_activation():
    config = _tiny_config()
    estimate = limits.estimate_memory(config, jnp.float32, batch=2, capacity=256,
                                      forwards={"prefill": (16, True), "step": (8, True)})
    assert estimate.cache_bytes == 2 * 6 * 2 * 256 * 2 * 32 * 4
    # MLP of the prefill: 3 x B x T x F x 4 bytes beats scores 2 x 4 x 16 x 272 x 4.
    assert estimate.activation_bytes == 3 * 2 * 16 * 512 * 4
    assert estimate.activation == "MLP hidden of the prefill (T=16)"
    # The quadratic self-spec forward of the issue (block 100: T = 100 x 101 tokens).
    quadratic = limits.estimate_memory(config, jnp.float32, batch=1, capacity=10240,
                                       forwards={"prefill": (16, True), "step": (10100, True)})
    assert quadratic.activation.startswith("attention scores of the step (T=10100")
    assert quadratic.total_bytes > 3 * 2**30
    flash = limits.estimate_memory(config, jnp.float32, batch=1, capacity=10240,
                                   forwards={"prefill": (16, False), "step": (10100, False)})
    assert flash.activation.startswith("MLP hidden of the step")


def test_check_memory_refuses_with_the_figures():
    estimate = limits.MemoryEstimate(cache_bytes=3 << 30, activation_bytes=1 << 29,
                                     activation="attention scores of the step (T=8, S=64)")
    limits.check_memory(estimate, (4 << 30, "free"))
    limits.check_memory(estimate, (None, "unknown"))  # nothing to compare with
    with pytest.raises(limits.ResourceLimitError) as info:
        limits.check_memory(estimate, (2 << 30, "available on this host"))
    message = str(info.value)
    assert "needs at least 3.50 GiB (KV cache 3.00 GiB + the biggest activation 0.50 GiB: " \
           "attention scores of the step (T=8, S=64)), more than the 2.00 GiB available on " \
           "this host" in message
    assert isinstance(info.value, ValueError)


def test_available_memory_reads_this_machine():
    free, where = limits.available_memory()
    assert free is not None and free > 1 << 20 and where


def test_config_replace_keeps_estimate_linear_in_batch():
    config = dataclasses.replace(_tiny_config(), max_position_embeddings=1 << 20)
    one = limits.estimate_memory(config, jnp.bfloat16, batch=1, capacity=1 << 20,
                                 forwards={"prefill": (16, False)})
    many = limits.estimate_memory(config, jnp.bfloat16, batch=64, capacity=1 << 20,
                                  forwards={"prefill": (16, False)})
    assert many.cache_bytes == 64 * one.cache_bytes == 64 * 2 * 6 * (1 << 20) * 2 * 32 * 2


@pytest.fixture(scope="module")
def tiny_model():
    return nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")


@pytest.mark.parametrize("mode, block, largest", [
    ("self_spec_quadratic", 100, 32), ("self_spec_quadratic", 64, 32),
    ("self_spec", 300, 256), ("diffusion", 257, 256)])
def test_the_largest_block_of_each_mode_is_refused_at_once(tiny_model, mode, block, largest):
    """Issue 10: quadratic self-spec at block 100 ran for 9 minutes at 11 GB; now it is refused
    before anything is compiled, the limit in the message."""
    start = time.perf_counter()
    with pytest.raises(limits.ResourceLimitError) as info:
        nld_jax.generate(tiny_model, ["<s> sort 3 1 2 4 ="], mode=mode, block_size=block,
                         max_new_tokens=8)
    assert time.perf_counter() - start < 1.0
    assert f"block_size={block} is larger than this mode's largest block, {largest}" in \
        str(info.value)
    nld_jax.generate(tiny_model, ["<s> sort 3 1 2 4 ="], mode=mode, block_size=largest // 16,
                     max_new_tokens=2)  # a block within the limit runs


def test_a_call_that_cannot_fit_is_refused_before_compiling(tiny_model, monkeypatch):
    generate_module = importlib.import_module("nld_jax.generate")  # not the function
    compiled = generate_module._program._cache_size()
    monkeypatch.setattr(limits, "available_memory", lambda device=None: (1 << 20, "free (test)"))
    with pytest.raises(limits.ResourceLimitError) as info:
        nld_jax.generate(tiny_model, ["<s> sort 3 1 2 4 ="] * 4, mode="self_spec",
                         max_new_tokens=200)
    message = str(info.value)
    assert "needs at least" in message and "KV cache" in message and "free (test)" in message
    assert generate_module._program._cache_size() == compiled  # nothing was compiled


def test_an_enormous_cache_is_refused_on_this_machine():
    """64 rows of a 2**20-token context: a 200 GB cache, refused with the figures."""
    config = dataclasses.replace(_tiny_config(), max_position_embeddings=1 << 20,
                                 original_max_position_embeddings=512)
    model = NLDModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(limits.ResourceLimitError, match=r"KV cache 192\.\d\d GiB"):
        nld_jax.generate(model, [[1, 4, 5]] * 64, mode="ar", max_new_tokens=8,
                         max_cache_len=1 << 20)


def test_estimate_under_a_mesh_is_one_devices_share():
    """TP=4 x DP=2 on an abstract mesh: the cache splits over kv heads and rows, each
    activation over its sharded axis; a kv-head count that the rules replicate stays whole."""
    from jax.sharding import AbstractMesh, AxisType

    from nld_jax.sharding import DEFAULT_RULES, Layout

    def layout(**rules):  # Layout.create wants a concrete Mesh; the estimate reads its shape
        return Layout(mesh, tuple(sorted({**DEFAULT_RULES, **rules}.items())))

    config = _tiny_config()  # 4 query heads, 2 kv heads
    mesh = AbstractMesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    forwards = {"prefill": (16, True), "step": (8, True)}
    whole = limits.estimate_memory(config, jnp.float32, batch=3, capacity=256, forwards=forwards)
    part = limits.estimate_memory(config, jnp.float32, batch=3, capacity=256, forwards=forwards,
                                  layout=layout())
    # 3 rows over 2 data shards: 2 on the fuller one; 2 kv heads over 2 model shards: 1.
    assert part.cache_bytes == whole.cache_bytes * 2 // 3 // 2
    assert part.activation == whole.activation == "MLP hidden of the prefill (T=16)"
    assert part.activation_bytes == whole.activation_bytes * 2 // 3 // 2
    replicated = limits.estimate_memory(config, jnp.float32, batch=3, capacity=256,
                                        forwards=forwards,
                                        layout=layout(kv_heads=None))
    assert replicated.cache_bytes == whole.cache_bytes * 2 // 3


def test_host_memory_is_shared_by_a_meshes_cpu_devices():
    free, where = limits.available_memory()
    shared, shared_where = limits.available_memory(host_sharers=8)
    assert shared_where.endswith("(1/8: one device's share)")
    assert abs(shared - free // 8) < free // 16  # MemAvailable moves between the two reads
