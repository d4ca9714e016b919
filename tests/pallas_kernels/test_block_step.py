"""confidence_commit / verify_accept: interpreter numerics, CUDA lowering, and the GPU."""

from __future__ import annotations

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.kernels import on_hopper
from pallas_kernels.block_step import (
    TuningConfig,
    _stats_call,
    confidence_commit,
    verify_accept,
)
from pallas_kernels.block_step_ref import confidence_commit_ref, verify_accept_ref

H100 = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132))
INTERPRET = plgpu.InterpretGPUParams()


def _block(seed: int, b: int, t: int, v: int, scale: float):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(keys[0], (b, t, v)) * scale
    masked = jax.random.bernoulli(keys[1], 0.7, (b, t)).at[:, 0].set(False)
    tokens = jnp.where(masked, 100, jax.random.randint(keys[2], (b, t), 0, v)).astype(jnp.int32)
    return logits, tokens, masked


class TestInterpret:
    @pytest.mark.parametrize("b,t,v,scale,threshold", [
        (2, 8, 256, 3.0, 0.3), (1, 32, 512, 6.0, 0.9), (3, 1, 128, 2.0, 0.5),
        (1, 64, 256, 4.0, 0.05),
    ])
    def test_confidence_commit_matches_reference(self, b, t, v, scale, threshold):
        logits, tokens, masked = _block(b * 1000 + t, b, t, v, scale)
        got = jax.block_until_ready(confidence_commit(logits, tokens, masked, threshold,
                                                      TuningConfig(block_v=128),
                                                      interpret=INTERPRET))
        want = confidence_commit_ref(logits, tokens, masked, threshold)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
        assert (np.asarray(got[1]).sum(1) < np.asarray(masked).sum(1)).all() or not masked.any()

    @pytest.mark.parametrize("b,t,v,agree", [(2, 8, 256, [3, 7]), (1, 32, 512, [31]),
                                             (2, 4, 128, [0, 2])])
    def test_verify_accept_matches_reference(self, b, t, v, agree):
        logits, _, _ = _block(t + v, b, t, v, 3.0)
        predicted = jnp.argmax(logits, -1).astype(jnp.int32)
        drafts = jnp.concatenate([jnp.full((b, 1), 5, jnp.int32), predicted[:, :-1]], axis=1)
        for row, run in enumerate(agree):  # break the agreement after `run` drafts
            if run < t - 1:
                drafts = drafts.at[row, run + 1].set((predicted[row, run] + 1) % v)
        got = jax.block_until_ready(verify_accept(logits, drafts, TuningConfig(block_v=128),
                                                  interpret=INTERPRET))
        want = verify_accept_ref(logits, drafts)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(got[1], agree)

    @pytest.mark.parametrize("t", [8, 64])
    def test_outputs_fully_written(self, t):
        """Fresh interpreter memory is NaN: every statistic of the block's rows is written."""
        logits, _, _ = _block(1, 2, t, 256, 3.0)
        params = plgpu.InterpretGPUParams(detect_races=True)
        arg, row_sum = jax.block_until_ready(_stats_call(
            logits, config=TuningConfig(block_v=128), interpret=params))
        assert np.isfinite(np.asarray(row_sum[:, :t])).all()
        assert ((np.asarray(arg[:, :t]) >= 0) & (np.asarray(arg[:, :t]) < 256)).all()

    def test_unsupported_inputs_raise(self):
        logits, tokens, masked = _block(0, 1, 8, 256, 1.0)
        with pytest.raises(NotImplementedError, match="float32"):
            confidence_commit(logits.astype(jnp.bfloat16), tokens, masked, 0.9)
        with pytest.raises(ValueError, match="multiple of"):
            verify_accept(logits[..., :200], tokens)
        with pytest.raises(ValueError, match="shared memory"):
            TuningConfig(block_v=1024)


class TestExport:
    @pytest.mark.parametrize("name", ["3B", "8B", "14B"])
    @pytest.mark.parametrize("tokens", [8, 32])
    def test_lowers_for_cuda(self, name, tokens):
        v = nld_jax.NLDConfig.preset(name).vocab_size
        spec = jax.ShapeDtypeStruct
        with jax.sharding.use_abstract_mesh(H100):
            commit = jax.export.export(jax.jit(confidence_commit), platforms=["cuda"])(
                spec((1, tokens, v), jnp.float32), spec((1, tokens), jnp.int32),
                spec((1, tokens), jnp.bool_), spec((), jnp.float32))
            verify = jax.export.export(jax.jit(verify_accept), platforms=["cuda"])(
                spec((1, tokens, v), jnp.float32), spec((1, tokens), jnp.int32))
        assert "mosaic_gpu" in commit.mlir_module() and "mosaic_gpu" in verify.mlir_module()


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU (H100/H200)")
class TestGPU:
    @pytest.mark.parametrize("tokens", [8, 32])
    def test_kernels_match_reference(self, tokens):
        logits, drafts, masked = _block(tokens, 4, tokens, 131072, 4.0)
        got = jax.jit(confidence_commit)(logits, drafts, masked, 0.5)
        want = confidence_commit_ref(logits, drafts, masked, 0.5)
        np.testing.assert_array_equal(got[0], want[0])
        got = jax.jit(verify_accept)(logits, drafts)
        want = verify_accept_ref(logits, drafts)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_decode_loops_run_the_kernels_in_interpret_mode():
    """generate() with attention_impl="pallas" runs the attention and step kernels inside the
    while_loop (interpreted here) and decodes what the XLA path decodes.

    A sharpened head keeps argmax gaps far above the bf16 differences between the kernel's and
    XLA's attention; a low threshold commits a whole block in one step.
    """
    from flax import nnx

    from nld_jax.generate import _program
    from nld_jax.model import NLDModel

    config = nld_jax.NLDConfig.preset("tiny", head_dim=64, num_hidden_layers=1, vocab_size=256,
                                  block_size=8)
    model = NLDModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.head_dv[...] = model.head_dv[...] * 30
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    outputs = {}
    for impl in ("xla", "pallas"):
        model.attention_impl = impl
        with plgpu.force_gpu_interpret_mode(INTERPRET):
            for mode, kwargs in (("diffusion", dict(threshold=1e-3)), ("self_spec", {})):
                before = _program._cache_size()
                outputs[impl, mode] = nld_jax.generate(model, prompts, mode=mode,
                                                       max_new_tokens=8, eos_token_ids=[255],
                                                       **kwargs)
                assert _program._cache_size() == before + 1
    for mode in ("diffusion", "self_spec"):
        assert outputs["pallas", mode].tokens == outputs["xla", mode].tokens
        assert outputs["pallas", mode].num_forwards == outputs["xla", mode].num_forwards
