"""Chunked prefill compiled for an H100: the Pallas attention kernel serves the chunks, and the
program's temporaries stay near the KV cache instead of growing with the prompt."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from flax import nnx

import nld_jax
from nld_jax import aot
from nld_jax.model import NLDModel

generate_module = importlib.import_module("nld_jax.generate")
PROGRAM = generate_module._program  # before any test replaces it
PROMPT, CHUNK, LAYERS = 32768, 512, 2


class _Compiled(Exception):
    """Raised once the program has compiled: generate() stops there."""


def _compile(prompt: int, chunk: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, int]:
    """(the H100 Program of an 8B-shape AR request, its cache slots), nothing run."""
    config = nld_jax.NLDConfig.preset("8B", num_hidden_layers=LAYERS)
    model = nnx.eval_shape(lambda: NLDModel(config, dtype="bfloat16", rngs=nnx.Rngs(0)))
    model.attention_impl = "pallas"  # the CPU host is no Hopper: force the kernel path
    mesh = aot.target_mesh("h100")
    out: dict[str, Any] = {}

    def compile_only(graphdef: Any, *args: Any, static: Any, **kwargs: Any) -> Any:
        out["program"] = aot.compile_program(
            lambda *a: PROGRAM(graphdef, *a, static=static, **kwargs), *aot.abstract(args, mesh))
        out["capacity"] = static.capacity
        raise _Compiled

    monkeypatch.setattr(generate_module, "_program", compile_only)
    monkeypatch.setattr(generate_module.limits, "check_memory", lambda *args: None)
    with pytest.raises(_Compiled):
        nld_jax.generate(model, [[1] * prompt], max_new_tokens=64, prefill_chunk=chunk)
    return out["program"], out["capacity"]


def test_chunks_run_on_the_kernel_within_the_cache_bound(monkeypatch):
    chunked, capacity = _compile(PROMPT, CHUNK, monkeypatch)
    whole, _ = _compile(PROMPT, PROMPT, monkeypatch)
    config = nld_jax.NLDConfig.preset("8B")
    cache = 2 * LAYERS * capacity * config.num_key_value_heads * config.head_dim * 2  # bf16
    # The kernel attends in tiles: no [C, N, S] scores. The cache (possibly held twice across
    # the loops' carries) and one chunk's activations (tens of MiB at C=512) bound the rest.
    bound = 3 * cache + 64 * (1 << 20)
    assert chunked.kernel_calls >= 1
    assert chunked.while_ops == whole.while_ops + 1  # the chunk loop
    assert chunked.temp_bytes <= bound, (chunked.temp_bytes, bound)
    assert whole.temp_bytes > bound, (whole.temp_bytes, bound)
