"""Model forwards compiled for an H100, their cost model, and the benchmark built on them."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import jax
import pytest

import nld_jax
from nld_jax import aot
from pallas_kernels.block_attention import kernel_cost

# Kernel-sized heads (head_dim 64) on a two-layer model: compiles in seconds.
SMALL = nld_jax.NLDConfig.preset("tiny", head_dim=64, vocab_size=512, block_size=8)


def _benchmark():
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "h100_model.py"
    spec = importlib.util.spec_from_file_location("h100_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["h100_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mesh():
    return aot.target_mesh("h100")


@pytest.mark.parametrize("pattern,tokens,attention", [("causal", 8, "pallas"),
                                                      ("prefill", 64, "pallas"),
                                                      ("quadratic", 72, "xla")])
def test_forward_compiles_with_its_kernels(pattern, tokens, attention, mesh):
    forward = aot.compile_forward(SMALL, tokens, 256, 100, mesh=mesh, attention=attention,
                                  pattern=pattern)
    program = forward.program
    kernels = SMALL.num_hidden_layers if attention == "pallas" else 0
    assert program.kernel_calls == kernels
    assert all(r.spill_bytes == 0 and not r.messages for r in program.ptxas)
    assert program.while_ops == 0 and program.host_callbacks == 0
    assert forward.cost.bytes >= forward.ideal.bytes > 0
    assert forward.cost.flops > 0


def test_kernel_cost_counts_the_valid_cache_once_per_kv_head():
    # T=1 against 4096 valid keys (8B heads): K and V of the valid prefix dominate; the rest
    # is the 64-row q tile, the block's 64-key tile and 8 splits' float32 partials.
    nbytes, flops = kernel_cost(1, 1, 32, 8, 128, 4096, slots=8192)
    cache_bytes = 2 * 8 * 4096 * 128 * 2
    assert cache_bytes < nbytes < 1.2 * cache_bytes
    # Twice the valid length: twice the cache bytes and flops (the fixed terms aside).
    nbytes2, flops2 = kernel_cost(1, 1, 32, 8, 128, 8192, slots=8192)
    assert nbytes2 - nbytes == pytest.approx(cache_bytes, rel=0.02)
    assert flops2 == pytest.approx(2 * flops, rel=0.02)
    # A causal block reads fewer of its own tiles than a bidirectional one.
    assert kernel_cost(1, 512, 32, 8, 128, 0)[0] < kernel_cost(1, 512, 32, 8, 128, 0,
                                                               causal=False)[0]


def test_benchmark_modes_and_table():
    bench = _benchmark()
    forwards = [dict(name=s.name, T=s.tokens, S=s.slots, valid=s.valid, attention=s.attention,
                     bytes=1e9, flops=1e12, est_ms=ms, ideal_ms=ms / 1.1, ratio=1.1,
                     compile_s=1.0, temp_bytes=0)
                for s, ms in zip(bench.forward_shapes(nld_jax.NLDConfig.preset("8B")),
                                 (5.0, 6.0, 20.0, 8.0, 140.0), strict=True)]
    modes = {m["mode"]: m for m in bench.model_modes(forwards)}
    assert modes["ar"]["tokens_per_s"] == pytest.approx(200)
    assert modes["self_spec"]["tokens_per_s"] == pytest.approx(1e3 * 6.82 / 12)
    assert modes["self_spec_quadratic"]["tokens_per_s"] == pytest.approx(1e3 * 6.4 / 20)
    assert modes["diffusion"]["tokens_per_s"] == pytest.approx(1e3 * 2.6 / 6)
    result = dict(size="8B", target="h100", jax="0.11.2", commit="x", date="d",
                  forwards=forwards, kernels=[dict(name="k", config="c", registers=1,
                                                   spill_bytes=0)],
                  programs=[dict(mode="ar", compile_s=30.0, temp_bytes=1e9, while_ops=3)],
                  modes=list(modes.values()))
    text = bench.table(result)
    assert "not a GPU measurement" in text and "| quadratic T=32*33 |" in text
    assert "| ar | 30.0 | 1.00 | 3 |" in text


def test_instruction_costs_sum_to_the_whole_program(mesh):
    # Every instruction of the entry computation costed alone by XLA's own analysis: the rows
    # sum to the whole-module analysis (float32 accumulation: within 1e-5), and with the gather
    # correction and the kernel's own model to the forward's cost.
    from jax._src.lib import _jax

    forward = aot.compile_forward(SMALL, 8, 256, 100, mesh=mesh)
    rows = forward.instructions()
    module = forward.program.compiled.runtime_executable().hlo_modules()[0]
    whole = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    assert sum(r.xla_bytes for r in rows) == pytest.approx(whole["bytes accessed"], rel=1e-5)
    assert sum(r.flops for r in rows) == pytest.approx(forward.cost.flops, rel=1e-5)
    assert sum(r.bytes for r in rows) == pytest.approx(forward.cost.bytes, rel=1e-5)
    kernels = [r for r in rows if r.kind == "custom call mosaic_gpu_v2"]
    assert len(kernels) == SMALL.num_hidden_layers
    assert all(r.bytes == forward.kernel.bytes > 0 for r in kernels)
    assert any(r.kind == "triton gemm" for r in rows)
    # The block's embedding lookup is a fused gather of T rows: XLA charges the whole table,
    # the model the rows (read) and the gathered block (written).
    (lookup,) = [r for r in rows if r.op.startswith("jit(_take)")]
    assert lookup.xla_bytes - lookup.bytes == (SMALL.vocab_size - 8) * SMALL.hidden_size * 2


# Split-K partials reduced in a fusion that keeps one of six heads' columns (as the v path of
# a fused q/k/v projection does), or sliced before the reduce.
_PARTIALS = """HloModule partials

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_v (p: f32[4,32,6144]) -> bf16[32,8,128] {
  %p = f32[4,32,6144]{2,1,0} parameter(0)
  %zero = f32[] constant(0)
  %reduced = f32[32,6144]{1,0} reduce(%p, %zero), dimensions={0}, to_apply=%add
  %cast = bf16[32,6144]{1,0} convert(%reduced)
  %heads = bf16[32,8,6,128]{3,2,1,0} bitcast(%cast)
  %v = bf16[32,8,1,128]{3,2,1,0} slice(%heads), slice={[0:32], [0:8], [5:6], [0:128]}
  ROOT %out = bf16[32,8,128]{2,1,0} bitcast(%v)
}

%fused_sliced_first (q: f32[4,32,6144]) -> f32[32,1024] {
  %q = f32[4,32,6144]{2,1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  %cut = f32[4,32,1024]{2,1,0} slice(%q), slice={[0:4], [0:32], [5120:6144]}
  ROOT %reduced.1 = f32[32,1024]{1,0} reduce(%cut, %zero.1), dimensions={0}, to_apply=%add
}

ENTRY %main (partials: f32[4,32,6144]) -> (bf16[32,8,128], f32[32,1024]) {
  %partials = f32[4,32,6144]{2,1,0} parameter(0)
  %v_fusion = bf16[32,8,128]{2,1,0} fusion(%partials), kind=kLoop, calls=%fused_v
  %sliced_fusion = f32[32,1024]{1,0} fusion(%partials), kind=kInput, calls=%fused_sliced_first
  ROOT %both = (bf16[32,8,128]{2,1,0}, f32[32,1024]{1,0}) tuple(%v_fusion, %sliced_fusion)
}
"""


def test_a_fusion_is_charged_the_inputs_its_outputs_depend_on():
    # Only `hlo` of a Program is read.
    v, sliced, _ = aot.instruction_costs(types.SimpleNamespace(hlo=_PARTIALS))
    partials, v_out = 4 * 32 * 6144 * 4, 32 * 8 * 128 * 2
    # XLA charges all the partials; the fusion reads the sixth its output depends on.
    assert v.xla_bytes == partials + v_out
    assert v.bytes == partials // 6 + v_out
    # Sliced before the reduce: XLA already charges the slice, and nothing is taken off twice.
    assert sliced.xla_bytes == sliced.bytes == partials // 6 + 32 * 1024 * 4
