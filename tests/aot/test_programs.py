"""Each mode's whole 8B generate program, compiled for an H100 with the kernels selected."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import nld_jax
from nld_jax import aot
from tests.test_layer_loop import cache_copies

CONFIG = nld_jax.NLDConfig.preset("8B")
NEW_TOKENS = 256
PREFILL_CHUNK = inspect.signature(nld_jax.generate).parameters["prefill_chunk"].default


@pytest.fixture(scope="module")
def mesh():
    return aot.target_mesh("h100")


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [512, 8192])
@pytest.mark.parametrize("mode", nld_jax.MODES)
def test_generate_program(mode, prompt, mesh):
    """One decode while loop at the top level (plus the chunked prefill's; the layers are
    scanned, CI's faster compile, and a layer scan has the layer count as its trip count), no
    host callback, the attention kernel in the prefill and the loop, every kernel without
    spills, temp memory under the first-principles bound (nld_jax.aot.generate_temp_bound)."""
    program = aot.compile_generate(CONFIG, mode, prompt, NEW_TOKENS, mesh=mesh,
                                   layer_loop="scan")
    loops = program.top_level_loops
    # The decode loop (denoise steps nest inside it), and a prompt wider than generate()'s
    # prefill_chunk (512) is prefilled by a loop over chunks.
    assert loops.count(None) == (1 if prompt <= PREFILL_CHUNK else 2), loops
    assert all(n in (None, CONFIG.num_hidden_layers) for n in loops), loops
    assert program.host_callbacks == 0
    assert program.kernel_calls >= 2  # the prefill's and the decode loop's attention
    assert all(r.spill_bytes == 0 and not r.messages for r in program.ptxas), program.ptxas
    bound = aot.generate_temp_bound(CONFIG, prompt, NEW_TOKENS, CONFIG.block_size)
    assert 0 < program.temp_bytes <= bound, (program.temp_bytes, bound)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "self_spec"])
def test_unrolled_decode_loop_holds_no_cache_copy(mode, mesh):
    """The unrolled layers (the GPU default) write the stacked KV cache in place: no copy of
    a whole [L, B, S, K, H] cache in the program's loops (tests/test_layer_loop.py on CPU)."""
    config = dataclasses.replace(CONFIG, num_hidden_layers=3)
    program = aot.compile_generate(config, mode, 100, 64, mesh=mesh, layer_loop="unroll")
    assert program.kernel_calls >= 2  # the attention kernel reads the cache
    # S: the widest [L, 1, S, K, H] buffer (the prefill's K/V are narrower).
    capacity = max(map(int, re.findall(rf"bf16\[3,1,(\d+),{config.num_key_value_heads},"
                                       rf"{config.head_dim}\]", program.hlo)))
    assert cache_copies(program.hlo, config, "bfloat16", 1, capacity) == 0
