"""block_attention: interpret mode on CPU, CUDA lowering at the released shapes, and the GPU."""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nld_jax
from nld_jax.cache import KVCache
from nld_jax.kernels import Kernels, on_hopper
from nld_jax.model import NLDModel
from pallas_kernels.block_attention import (
    TuningConfig,
    _kernel_call,
    block_attention,
    default_config,
)
from pallas_kernels.block_attention_ref import block_attention_ref
from tests.conftest import INTERPRETER_POOL_THREADS

# bf16 output: one rounding of values of magnitude ~1 (2**-8) plus the bf16 probabilities.
ATOL = 3e-2
H100 = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132))


@functools.partial(nnx.jit, static_argnames=("causal", "kernel"))
def _forward(model: NLDModel, tokens, cache, causal: bool, kernel: bool):
    # One jitted program, not op-by-op: the interpreter's callbacks dispatch eager ops to the CPU
    # client, which can queue them behind eagerly dispatched ops that wait on the kernel itself
    # (a deadlock seen in CI). Every interpreted call is therefore jitted and awaited.
    return model.forward(tokens, cache, causal=causal, attention_kernel=kernel)


def _inputs(seed: int, b: int, t: int, n: int, k: int, h: int, s: int, layers: int = 1):
    """q [B, T, N, H], stacked caches [L, B, S, K, H], block K/V [B, T, K, H]."""
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)  # noqa: E731
    return (normal(keys[0], (b, t, n, h)), normal(keys[1], (layers, b, s, k, h)),
            normal(keys[2], (layers, b, s, k, h)), normal(keys[3], (b, t, k, h)),
            normal(keys[4], (b, t, k, h)))


class TestInterpret:
    """Numerics against the jnp reference in the Mosaic-GPU interpreter, fresh inputs each."""

    @pytest.mark.parametrize("b,t,n,k,lengths,causal,layer,config", [
        (2, 1, 4, 1, [70, 0], True, 0, TuningConfig(block_q=64)),  # AR decode, G=4, empty row
        (2, 8, 8, 2, [100, 64], False, 1, TuningConfig(block_q=64)),  # bidirectional block
        (2, 8, 8, 2, [100, 128], True, 2, TuningConfig(block_q=64, num_splits=2)),  # splits
        (1, 40, 6, 2, [5], True, 1, TuningConfig(block_q=64)),  # G=3, rows span 2 q tiles
        # 128-row tiles: two warpgroups share the K/V tiles.
        (1, 32, 4, 1, [130], False, 2, TuningConfig(block_q=128, num_splits=3)),
        (1, 48, 4, 1, [70], True, 0, TuningConfig(block_q=128)),  # causal across both halves
        (1, 70, 2, 1, [0], True, 1, TuningConfig(block_q=64)),  # prefill: own keys, 2 tiles
    ])
    def test_matches_reference(self, b, t, n, k, lengths, causal, layer, config):
        seed = hash((b, t, n, k, tuple(lengths), causal)) % 2**31
        q, kc, vc, kb, vb = _inputs(seed, b, t, n, k, 64, 192, layers=3)
        lengths = jnp.asarray(lengths, jnp.int32)
        out = jax.block_until_ready(block_attention(
            q, kc, vc, lengths, kb, vb, causal, jnp.int32(layer), config,
            interpret=plgpu.InterpretGPUParams()))
        ref = block_attention_ref(q, kc, vc, lengths, kb, vb, causal, layer)
        assert out.shape == q.shape and out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=ATOL)

    @pytest.mark.parametrize("size,n,k,lengths,config", [
        (3, 4, 2, [40, 0], TuningConfig(block_q=64)),  # T=12: one row tile, one key tile
        (8, 2, 2, [130], TuningConfig(block_q=64, num_splits=2)),  # T=72: own keys, 2 tiles
        (4, 8, 2, [64], TuningConfig(block_q=128)),  # T=20, G=4: two warpgroups
    ])
    def test_quadratic_pattern_matches_explicit_mask(self, size, n, k, lengths, config):
        """quadratic=b computes the pattern that self_spec_quadratic.block_layout spells out;
        the oracle is the XLA attention with that explicit mask."""
        from nld_jax.attention import attend
        from nld_jax.decode.self_spec_quadratic import block_layout

        t = size * (size + 1)
        q, kc, vc, kb, vb = _inputs(size, len(lengths), t, n, k, 64, 192, layers=2)
        lengths = jnp.asarray(lengths, jnp.int32)
        out = jax.block_until_ready(block_attention(
            q, kc, vc, lengths, kb, vb, True, jnp.int32(1), config,
            interpret=plgpu.InterpretGPUParams(), quadratic=size))
        ref = attend(q, kb, vb, cache=KVCache(k=kc, v=vc, lengths=lengths), layer=1,
                     block_mask=jnp.asarray(block_layout(size)[2]))
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=ATOL)
        with pytest.raises(ValueError, match="quadratic"):
            block_attention(q[:, :-1], kc, vc, lengths, kb[:, :-1], vb[:, :-1], True,
                            quadratic=size)

    @pytest.mark.parametrize("block_q", [64, 128])
    def test_every_output_written_and_no_races(self, block_q):
        """The interpreter fills fresh memory with NaN: any unwritten output element shows."""
        q, kc, vc, kb, vb = _inputs(3, 2, 8, 8, 2, 64, 128, layers=2)
        rows = 8 * 4
        q_rows = jnp.pad(q.reshape(2, 8, 2, 4, 64).transpose(0, 2, 1, 3, 4).reshape(2, 2, rows,
                                                                                     64),
                         ((0, 0), (0, 0), (0, block_q - rows), (0, 0)))
        pad = ((0, 0), (0, 56), (0, 0), (0, 0))
        # lengths [0, 100], causal, layer 1
        meta = jnp.zeros((32,), jnp.int32).at[:2].set(jnp.array([0, 100])).at[2:4].set(1)
        params = plgpu.InterpretGPUParams(detect_races=True)
        out, row_max, row_sum = jax.block_until_ready(_kernel_call(
            q_rows, kc, vc, jnp.pad(kb, pad), jnp.pad(vb, pad), meta,
            config=TuningConfig(block_q=block_q, num_splits=3), tokens=8, groups=4,
            interpret=params))
        for array in (out, row_sum):
            assert np.isfinite(np.asarray(array)).all()
        assert not np.isnan(np.asarray(row_max)).any()  # empty splits write -inf, not nothing

    def test_model_forward_with_kernel_equals_xla(self):
        """The network with the attention kernel (interpreted) equals the XLA path; two layers,
        so the kernel reads the stacked cache at the scan's traced layer index."""
        config, model, tokens, cache = _two_layer_model_and_cache(1, 24, [24, 10])
        block = tokens[:, :8]
        results = {}
        for kernel in (False, True):
            with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
                for causal in (True, False):
                    results[kernel, causal] = np.asarray(jax.block_until_ready(
                        _forward(model, block, cache, causal, kernel))[0], np.float32)
        for causal in (True, False):
            np.testing.assert_allclose(results[True, causal], results[False, causal],
                                       atol=0.05, rtol=0.05)
        # A prefill: the kernel reads an empty cache (no valid prefix slot), XLA no cache at all.
        empty = KVCache.empty(num_layers=2, batch=2, capacity=64, num_kv_heads=2, head_dim=64,
                              dtype=jnp.bfloat16)
        prefill = {}
        for kernel in (False, True):
            with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
                hidden, block_kv = jax.block_until_ready(
                    _forward(model, tokens, empty if kernel else None, True, kernel))
            prefill[kernel] = (np.asarray(hidden, np.float32), np.asarray(block_kv.k, np.float32))
        np.testing.assert_allclose(prefill[True][0], prefill[False][0], atol=0.05, rtol=0.05)
        # The first layer's K comes from the embeddings alone; the second's through attention.
        np.testing.assert_array_equal(prefill[True][1][0], prefill[False][1][0])
        np.testing.assert_allclose(prefill[True][1], prefill[False][1], atol=0.05, rtol=0.05)

    def test_xla_cpu_pool_fits_two_warpgroups(self):
        """Each interpreted warpgroup of a 128-row tile blocks an XLA CPU pool thread at its
        barriers, as does the program around the kernel: a smaller pool hangs the two-warpgroup
        tests at random (tests/conftest.py sets PJRT_NPROC)."""
        jax.block_until_ready(jnp.ones(2) + 1)  # the CPU client and its pool exist
        pool = [task for task in os.listdir("/proc/self/task")
                if pathlib.Path(f"/proc/self/task/{task}/comm").read_text().strip()
                == "tf_XLAEigen"]
        assert len(pool) >= INTERPRETER_POOL_THREADS, (
            f"XLA's CPU pool has {len(pool)} threads (PJRT_NPROC="
            f"{os.environ.get('PJRT_NPROC')}); the interpreter needs {INTERPRETER_POOL_THREADS}")

    def test_model_quadratic_forward_with_kernel_equals_xla(self):
        """Quadratic self-speculation's forward: the kernel computing the pattern itself
        (quadratic=b) equals the XLA path given block_layout's explicit mask. T*G = 144 rows:
        two warpgroups per thread block, the case that needs the pool above."""
        from nld_jax.decode.self_spec_quadratic import block_layout

        config, model, _, cache = _two_layer_model_and_cache(2, 16, [16, 7])
        offsets, _, visible = block_layout(8)
        tokens = jax.random.randint(jax.random.key(3), (2, 72), 0, config.vocab_size)
        positions = cache.lengths[:, None] + jnp.asarray(offsets)[None, :]

        @functools.partial(nnx.jit, static_argnames="kernel")
        def forward(model, tokens, cache, kernel):
            if kernel:
                return model.forward(tokens, cache, causal=True, positions=positions,
                                     attention_kernel=True, quadratic=8)
            return model.forward(tokens, cache, causal=True, positions=positions,
                                 block_mask=jnp.asarray(visible))

        xla = np.asarray(forward(model, tokens, cache, False)[0], np.float32)
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            kernel = np.asarray(jax.block_until_ready(forward(model, tokens, cache, True))[0],
                                np.float32)
        np.testing.assert_allclose(kernel, xla, atol=0.05, rtol=0.05)

    def test_unsupported_inputs_raise(self):
        q, kc, vc, kb, vb = _inputs(0, 1, 4, 4, 1, 64, 128)
        with pytest.raises(NotImplementedError, match="bfloat16"):
            block_attention(q.astype(jnp.float32), kc, vc, jnp.array([4]), kb, vb, True)
        with pytest.raises(NotImplementedError, match="multiple of 64"):
            block_attention(q, kc[:, :, :100], vc[:, :, :100], jnp.array([4]), kb, vb, True)
        with pytest.raises(ValueError, match="multiple of config.block_kv"):
            block_attention(q, kc, vc, jnp.array([4]), kb, vb, True,
                            config=TuningConfig(block_kv=256))
        with pytest.raises(NotImplementedError, match="stacked"):
            block_attention(q, kc[0], vc[0], jnp.array([4]), kb, vb, True)
        with pytest.raises(ValueError, match="block_q"):
            TuningConfig(block_q=96)
        with pytest.raises(ValueError, match="shared memory"):
            block_attention(*_inputs(0, 1, 4, 4, 1, 256, 256)[:3], jnp.array([4]),
                            *_inputs(0, 1, 4, 4, 1, 256, 256)[3:], True,
                            config=TuningConfig(block_q=128, block_kv=256))
        with pytest.raises(NotImplementedError, match="bfloat16"):
            Kernels.choose("pallas", config=nld_jax.NLDConfig.preset("tiny", head_dim=64),
                           dtype=jnp.float32, capacity=128, block_size=None)


SHAPES = {name: nld_jax.NLDConfig.preset(name) for name in ("3B", "8B", "14B")}


class TestExport:
    """Full Mosaic lowering for CUDA at the released shapes, on CPU (no GPU needed)."""

    @pytest.mark.parametrize("name", sorted(SHAPES))
    @pytest.mark.parametrize("tokens,slots", [(1, 8192 + 256), (32, 8192 + 256), (512, 1024)])
    def test_lowers_for_cuda(self, name, tokens, slots):
        c = SHAPES[name]
        b, n, k, h = 1, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
        fn = jax.jit(functools.partial(block_attention))
        with jax.sharding.use_abstract_mesh(H100):
            exported = jax.export.export(fn, platforms=["cuda"])(
                spec(b, tokens, n, h), spec(c.num_hidden_layers, b, slots, k, h),
                spec(c.num_hidden_layers, b, slots, k, h),
                jax.ShapeDtypeStruct((b,), jnp.int32), spec(b, tokens, k, h),
                spec(b, tokens, k, h), jax.ShapeDtypeStruct((), jnp.bool_),
                jax.ShapeDtypeStruct((), jnp.int32))
        assert "mosaic_gpu" in exported.mlir_module()
        config = default_config(tokens * n // k, slots)
        assert config.smem_bytes(h) <= 227 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU (H100/H200)")
class TestGPU:
    """On the device: kernel vs reference at real shapes, and whole-model generate."""

    @pytest.mark.parametrize("tokens,lengths", [(1, [8000, 17]), (32, [4096, 0]),
                                                (512, [0, 300])])
    @pytest.mark.parametrize("causal", [True, False])
    def test_kernel_matches_reference(self, tokens, lengths, causal):
        q, kc, vc, kb, vb = _inputs(tokens, 2, tokens, 32, 8, 128, 8192, layers=2)
        lengths = jnp.asarray(lengths, jnp.int32)
        out = jax.jit(block_attention)(q, kc, vc, lengths, kb, vb, causal, 1)
        ref = block_attention_ref(q, kc, vc, lengths, kb, vb, causal, 1)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=ATOL)

    def test_generate_with_kernels_equals_xla(self):
        config = nld_jax.NLDConfig.preset("tiny", head_dim=128, vocab_size=512,
                                          num_attention_heads=8, num_key_value_heads=2)
        model = NLDModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        prompts = [[1, 2, 3, 4, 5], list(range(10, 60))]
        outputs = {}
        for impl in ("xla", "pallas"):
            outputs[impl] = []
            for mode in nld_jax.MODES:
                model.attention_impl = impl
                outputs[impl].append(nld_jax.generate(model, prompts, mode=mode,
                                                      max_new_tokens=32))
        # bf16: compare the distribution of agreement (near-ties may flip a token late).
        for xla_out, pallas_out in zip(outputs["xla"], outputs["pallas"], strict=True):
            for a, b in zip(xla_out.tokens, pallas_out.tokens, strict=True):
                assert a[:8] == b[:8]


def _two_layer_model_and_cache(seed: int, prompt_len: int, lengths: list[int]):
    """A bf16 two-layer tiny model (head_dim 64, as the kernel needs) and its cache holding a
    random prompt's K/V, rows valid up to `lengths`: (config, model, prompt, cache)."""
    config = nld_jax.NLDConfig.preset("tiny", head_dim=64, num_hidden_layers=2)
    model = NLDModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cache = KVCache.empty(num_layers=2, batch=2, capacity=128, num_kv_heads=2, head_dim=64,
                          dtype=jnp.bfloat16)
    prompt = jax.random.randint(jax.random.key(seed), (2, prompt_len), 0, config.vocab_size)
    _, block_kv = model.forward(prompt, cache, causal=True)
    return config, model, prompt, cache.write(block_kv, cache.lengths).advance(jnp.array(lengths))
