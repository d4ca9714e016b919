"""Every Pallas kernel configuration the model can select, compiled for sm_90a by ptxas."""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import pytest

import nld_jax
from nld_jax import aot

SIZES = ("3B", "8B", "14B")


def _assert_clean(program: aot.Program, calls: int = 1) -> None:
    """ptxas reported on every kernel: no spills, no warnings, no out-of-bound infos."""
    assert program.kernel_calls == calls
    assert len(program.ptxas) == calls, program.ptxas
    for report in program.ptxas:
        assert report.registers > 0, report
        assert report.spill_bytes == 0, report
        assert report.messages == (), report


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return aot.target_mesh("h100")


@pytest.mark.parametrize("size", SIZES)
def test_every_kernel_config_compiles_without_spills(size, mesh):
    cases = aot.kernel_cases(nld_jax.NLDConfig.preset(size), mesh)
    names = {case.name.split()[0] for case in cases}
    assert names == {"block_attention", "vocab_stats"}
    for case in cases:
        program = aot.compile_kernel(case)
        assert program.while_ops == 0 and program.host_callbacks == 0, case.name
        _assert_clean(program)


def test_ptxas_report_parsing():
    text = """ptxas /tmp/x, line 167; info    : Potential out of bound access while accessing \
symbol '__dynamic_shmem__0' of type '.b8' with instruction type '.b32'.
ptxas warning : Registers are spilled to local memory in function 'k_kernel', 664 bytes spill \
stores, 468 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_kernel' for 'sm_90a'
ptxas info    : Function properties for k_kernel
    280 bytes stack frame, 664 bytes spill stores, 468 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 280 bytes cumulative stack size
ptxas info    : Compile time = 136.844 ms
"""
    (report,) = aot.parse_ptxas(text)
    assert (report.kernel, report.registers, report.spill_stores, report.spill_loads) == (
        "k_kernel", 255, 664, 468)
    assert len(report.messages) == 2 and "out of bound" in report.messages[0]


def _register_hog(columns: int):
    """A kernel that keeps a 64 x `columns` float32 tile live in one warpgroup's registers
    (columns / 2 values per thread): over the 255-register budget for columns > ~400."""
    shape = (64, columns)

    def register_hog_kernel(x_ref, o_ref):
        def scoped(smem, bar):
            plgpu.copy_gmem_to_smem(x_ref, smem, bar)
            plgpu.barrier_wait(bar)
            values = jnp.exp(plgpu.layout_cast(smem[...], plgpu.Layout.WGMMA))
            total = values.sum(axis=1)  # every value stays live until the total is known
            smem[...] = values * jax.lax.broadcast_in_dim(total, shape, [0])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, o_ref)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM(shape, jnp.float32), plgpu.Barrier(num_barriers=1))

    return functools.partial(plgpu.kernel, out_type=jax.ShapeDtypeStruct(shape, jnp.float32),
                             compiler_params=plgpu.CompilerParams(
                                 lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(
        register_hog_kernel), shape


@pytest.mark.parametrize("columns,spills", [(128, False), (768, True)])
def test_layer_sees_what_export_cannot(columns, spills, mesh):
    """An over-budget tile lowers through jax.export, but ptxas spills it and this layer fails
    it; the same kernel at a small tile passes (the check is not vacuous)."""
    kernel, shape = _register_hog(columns)
    abstract_h100 = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132))
    with jax.sharding.use_abstract_mesh(abstract_h100):
        exported = jax.export.export(jax.jit(kernel), platforms=["cuda"])(
            jax.ShapeDtypeStruct(shape, jnp.float32))
    assert "mosaic_gpu" in exported.mlir_module()
    program = aot.compile_program(kernel, aot.abstract(jax.ShapeDtypeStruct(shape, jnp.float32),
                                                       mesh))
    (report,) = program.ptxas
    assert (report.spill_bytes > 0) == spills, report
    if spills:
        with pytest.raises(AssertionError):
            _assert_clean(program)
    else:
        _assert_clean(program)
