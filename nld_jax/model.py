"""The NLD network (a Ministral-3 decoder) in Flax NNX.

One network, two attention patterns: `model(tokens)` is causal (AR), `model(tokens, causal=False)`
is fully bidirectional (diffusion). Decoding modes use `forward`, which runs a block of T tokens at
absolute positions cache.lengths[b] + (0..T-1) against a read-only KV cache and returns hidden
states and the block's K/V; the caller applies the head (`logits`) to the rows it needs and
writes the K/V (`KVCache.write`) if it commits them.

The L decoder layers are stacked: every layer parameter has a leading [L] axis (built with
nnx.vmap), and a forward runs them with one lax.scan, so a program's compile time does not grow
with depth. `layer_loop="unroll"` runs the same body in a Python loop instead (see
`NLDModel.layer_loop` for when that is the default).

Shape letters: B batch, T tokens in this forward, S cache slots, L layers, D model dim,
N query heads, K KV heads, G = N/K, H head_dim, F MLP hidden, V vocab, R LoRA rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nld_jax.attention import attend
from nld_jax.cache import BlockKV, KVCache
from nld_jax.config import NLDConfig
from nld_jax.sharding import Layout, embed_lookup
from nld_jax.vision import VisionEncoder, embed_with_images, prepare_images

__all__ = ["NLDModel", "LAYER_LOOPS", "rope_inv_freq"]

LAYER_LOOPS = ("auto", "scan", "unroll")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype,
            std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _stacked[M: nnx.Module](make: Callable[[nnx.Rngs], M], count: int, rngs: nnx.Rngs) -> M:
    """`count` independently initialised copies of a module, as one module whose parameters
    have a leading [count] axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> M:
        return make(rngs)

    return build(rngs)


def rope_inv_freq(config: NLDConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), YaRN-corrected at every length as released."""
    d, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    extrap = (1.0 / pos_freqs).astype(np.float32)
    if config.rope_type == "default":
        return extrap
    interp = (1.0 / (np.float32(config.rope_factor) * pos_freqs)).astype(np.float32)

    def correction_dim(rotations: float) -> float:
        orig = config.original_max_position_embeddings
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(config.beta_fast), correction_dim(config.beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    return (interp * ramp + extrap * (1 - ramp)).astype(np.float32)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight (no 1+w offset)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...]


class OProjLoRA(nnx.Module):
    """The LinearSpec draft adapter on o_proj: delta = scale * (x @ A) @ B."""

    def __init__(self, config: NLDConfig, rank: int, scale: float, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        n, h, d = config.num_attention_heads, config.head_dim, config.hidden_size
        self.a_nhr = nnx.Param(_normal(rngs, (n, h, rank), dtype))
        self.b_rd = nnx.Param(jnp.zeros((rank, d), dtype))  # zero B: a fresh adapter is a no-op
        self.scale = scale

    def __call__(self, attn_btnh: jax.Array) -> jax.Array:
        low = jnp.einsum("BTNH,NHR->BTR", attn_btnh, self.a_nhr[...])
        return self.scale * jnp.einsum("BTR,RD->BTD", low, self.b_rd[...])


class Attention(nnx.Module):
    """GQA self-attention with YaRN RoPE and Llama-4 query scaling."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, n, k, h = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                      config.head_dim)
        # q, k and v in one weight, grouped by kv head: [j, :G] are the G query heads that share
        # kv head j (query heads j*G .. j*G+G-1), [j, G] its key, [j, G+1] its value. One matmul
        # reads x once and writes no per-projection intermediates (a T=1 forward on a GPU wrote
        # the K/V products twice), and sharding the K axis keeps each kv head with its query
        # heads on one device. D is minor (the released [out, in] order): a T=1 product on a
        # tensor-parallel shard is a reduction over D, and with D major XLA transposed the whole
        # local weight for it on every forward (benchmarks/NOTES_h100.md).
        self.qkv_kghd = nnx.Param(_normal(rngs, (k, n // k + 2, h, d), dtype))
        self.o_nhd = nnx.Param(_normal(rngs, (n, h, d), dtype))
        self.lora: OProjLoRA | None = nnx.data(None)
        self.config = config

    def _rotate(self, x_btnh: jax.Array, positions_bt: jax.Array) -> jax.Array:
        # Angles in float32, as the reference: bf16 positions would round 257 to 256.
        inv_freq = rope_inv_freq(self.config)  # a compile-time constant
        angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
        scale = self.config.rope_attention_factor
        cos = (jnp.cos(angles) * scale)[:, :, None, :]
        sin = (jnp.sin(angles) * scale)[:, :, None, :]
        x32 = x_btnh.astype(jnp.float32)
        x1, x2 = jnp.split(x32, 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return rotated.astype(x_btnh.dtype)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, *, cache: KVCache | None,
                 layer: jax.Array | int, causal: jax.Array | bool, lora_on: jax.Array | bool,
                 block_mask: jax.Array | None, attention_kernel: bool, quadratic: int,
                 layout: Layout | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x_btd.shape
        qkv = jnp.einsum("BTD,KGHD->BTKGH", x_btd, self.qkv_kghd[...])
        g = qkv.shape[3] - 2
        q = qkv[:, :, :, :g].reshape(b, t, -1, qkv.shape[-1])  # [B, T, N, H], N = K * G
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        q, k = self._rotate(q, positions_bt), self._rotate(k, positions_bt)
        beta = self.config.llama_4_scaling_beta
        if beta is not None:
            orig = self.config.original_max_position_embeddings
            floor = jnp.floor(positions_bt.astype(jnp.float32) / orig)
            q_scale = 1.0 + beta * jnp.log(1.0 + floor)
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        attn = attend(q, k, v, cache=cache, layer=layer, causal=causal, block_mask=block_mask,
                      kernel=attention_kernel, quadratic=quadratic, layout=layout)
        out = jnp.einsum("BTNH,NHD->BTD", attn, self.o_nhd[...])
        if self.lora is not None:
            delta = self.lora(attn).astype(out.dtype)
            lora_on = jnp.asarray(lora_on)
            if lora_on.ndim == 2:  # per token [B, T]
                lora_on = lora_on[:, :, None]
            out = out + jnp.where(lora_on, delta, jnp.zeros_like(delta))
        return out, k, v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        # gate and up in one weight ([:, 0] gate, [:, 1] up): one matmul of twice the width
        # (for T=32 a GPU gemm over 2F needs no split-K partials, benchmarks/NOTES_h100.md).
        self.gate_up_d2f = nnx.Param(_normal(rngs, (d, 2, f), dtype))
        self.down_fd = nnx.Param(_normal(rngs, (f, d), dtype))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_up = jnp.einsum("BTD,DCF->BTCF", x_btd, self.gate_up_d2f[...])
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_fd[...])


class DecoderLayer(nnx.Module):
    """Pre-norm: h + attn(norm(h)), then x + mlp(norm(x))."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, h_btd: jax.Array, positions_bt: jax.Array, **attention: object
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(hidden states after the layer, the block's K [B, T, K, H], its V)."""
        attn_out, k, v = self.attn(self.input_norm(h_btd), positions_bt, **attention)
        x = h_btd + attn_out
        return x + self.mlp(self.post_attn_norm(x)), k, v


class NLDModel(nnx.Module):
    """The Nemotron-Labs-Diffusion network: one set of weights, causal or bidirectional."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype | str = jnp.bfloat16,
                 vision_dtype: jnp.dtype | str = jnp.float32, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise ValueError(f"{dtype=} is not supported; use bfloat16 or float32")
        self.config = config
        self.dtype = dtype
        # The VLM's tower + projector (float32 by default: spec/vlm.md 3.7); None for text.
        self.vision: VisionEncoder | None = nnx.data(
            None if config.multimodal is None
            else VisionEncoder(config, dtype=vision_dtype, rngs=rngs))
        self.embed_vd = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size), dtype))
        # Every parameter of `layers` has a leading [L] axis; `layer(i)` is one layer's view.
        self.layers = _stacked(lambda r: DecoderLayer(config, dtype=dtype, rngs=r),
                               config.num_hidden_layers, rngs)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.head_dv = nnx.Param(_normal(rngs, (config.hidden_size, config.vocab_size), dtype))
        self.attention_impl = "auto"  # "auto" | "xla" | "pallas": see nld_jax.kernels
        # How forward runs the layers: "scan" (one lax.scan: compile time independent of
        # depth), "unroll" (a Python loop: L copies of the layer in the program) or "auto".
        # "auto" is scan, except on a GPU backend: there XLA copies each layer's weights out of
        # the stacked arrays when a scan slices them at a traced index, about three times the
        # weight traffic per forward (BENCHMARKS.md), so it unrolls. On CPU the scan compiles
        # faster and measured as fast as or faster than "unroll" (BENCHMARKS.md).
        self.layer_loop = "auto"

    @property
    def has_lora(self) -> bool:
        """Whether the LinearSpec draft adapter is attached."""
        return self.layers.attn.lora is not None

    def attach_lora(self, rank: int, scale: float, *, rngs: nnx.Rngs) -> None:
        """Adds a fresh (zero-B) o_proj LoRA adapter to every layer."""
        self.layers.attn.lora = nnx.data(_stacked(
            lambda r: OProjLoRA(self.config, rank, scale, dtype=self.dtype, rngs=r),
            self.config.num_hidden_layers, rngs))

    def layer(self, i: int) -> DecoderLayer:
        """Layer i's parameters, sliced out of the stacked ones (a copy: for reading)."""
        if not 0 <= i < self.config.num_hidden_layers:
            raise IndexError(f"layer {i} of a {self.config.num_hidden_layers}-layer model")
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

    def __call__(self, tokens: jax.Array, causal: bool = True,
                 images: list[list[np.ndarray]] | None = None) -> jax.Array:
        """Full-sequence logits.

        Args:
          tokens: int [B, T] at positions 0..T-1.
          causal: True for the AR pattern, False for every position attending to every position.
          images: VLM only: per row, that row's images in prompt order (float32 [3, H, W] as
            nld_jax.load_image returns them; [] for a row without), one image span each in
            the row's tokens; the <|image_pad|> embeddings are replaced by their features.
        Returns:
          float32 [B, T, V].
        """
        spliced = None
        # A VLM checks its prompts' image spans on the host (traced tokens, as in a jitted
        # training step without images, cannot be checked and hold no images).
        if images is not None or (self.vision is not None
                                  and not isinstance(tokens, jax.core.Tracer)):
            spliced = prepare_images(self.vision, self.config, np.asarray(tokens), images)
        hidden, _ = self.forward(tokens, None, causal=causal, images=spliced)
        return self.logits(hidden)

    def _unrolled(self) -> bool:
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop={self.layer_loop!r}; expected one of {LAYER_LOOPS}")
        if self.layer_loop == "auto":
            return jax.default_backend() == "gpu"
        return self.layer_loop == "unroll"

    def forward(self, tokens: jax.Array, cache: KVCache | None, *, causal: jax.Array | bool,
                lora_on: jax.Array | bool = False, positions: jax.Array | None = None,
                block_mask: jax.Array | None = None, attention_kernel: bool = False,
                quadratic: int = 0, images: tuple[jax.Array, jax.Array] | None = None
                ) -> tuple[jax.Array, BlockKV]:
        """A block of T tokens at positions cache.lengths[b] + (0..T-1) against the cache.

        The cache is only read: the block's own K/V come back for the caller to write
        (`cache.write(block_kv, at)`) when it commits them.

        Args:
          tokens: int [B, T].
          cache: the KV cache (None: no prefix, positions 0..T-1).
          causal: bool (may be traced): causal within the block, else bidirectional.
          lora_on: bool (may be traced), or bool [B, T] per token: apply the draft adapter.
          positions: int [B, T] RoPE positions overriding the default (training, quadratic
            self-speculation).
          block_mask: bool [T, T] or [B, T, T] in-block pattern overriding `causal`.
          attention_kernel: static; attend with the Pallas kernel (chosen once per program by
            nld_jax.kernels.Kernels; needs a cache and no block_mask).
          quadratic: static; b > 0: the block is quadratic self-speculation's b*(b+1) tokens,
            whose pattern the kernel computes itself (then no block_mask).
          images: (features [F, D], feature_index int [B, T]) from vision.prepare_images: the
            embedding of each position with an index >= 0 is replaced by that feature row.
        Returns:
          (the last layer's hidden states [B, T, D] (before the final norm), the block's K/V
          [L, B, T, K, H]).
        """
        b, t = tokens.shape
        if quadratic and not attention_kernel:
            raise ValueError("quadratic= is the kernel's pattern; the XLA path takes block_mask")
        if attention_kernel and (cache is None or block_mask is not None):
            raise ValueError("the attention kernel needs a KV cache and no explicit block_mask")
        if positions is None:
            starts = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
            positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        layout = getattr(self, "layout", None)  # set by nld_jax.sharding.shard_model
        h = embed_lookup(self.embed_vd[...], tokens, layout)
        if images is not None:
            h = embed_with_images(h, *images)
        graphdef, params = nnx.split(self.layers)

        def run_layer(h: jax.Array, layer_params: nnx.State, i: jax.Array | int
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            h, k, v = nnx.merge(graphdef, layer_params)(
                h, positions, cache=cache, layer=i, causal=causal, lora_on=lora_on,
                block_mask=block_mask, attention_kernel=attention_kernel, quadratic=quadratic,
                layout=layout)
            return h, (k, v)

        num_layers = self.config.num_hidden_layers
        if self._unrolled():
            ks, vs = [], []
            for i in range(num_layers):
                with jax.named_scope(f"layer_{i}"):
                    h, (k, v) = run_layer(h, jax.tree.map(lambda x, i=i: x[i], params), i)
                ks.append(k)
                vs.append(v)
            # The block's K/V of the last layer do not depend on that layer's read of the
            # cache, so a caller's cache.write would be unordered with the read, and XLA's copy
            # insertion would copy the whole cache every decode step to keep the read intact.
            # Tying the K/V to the final hidden states orders every read before the write, so
            # the write updates the cache in place (as the scan's loop boundary does).
            h, ks, vs = jax.lax.optimization_barrier((h, ks, vs))
            k_stacked, v_stacked = jnp.stack(ks), jnp.stack(vs)
        else:
            h, (k_stacked, v_stacked) = jax.lax.scan(
                lambda h, xs: run_layer(h, *xs), h,
                (params, jnp.arange(num_layers, dtype=jnp.int32)))
        return h, BlockKV(k=k_stacked, v=v_stacked)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The last layer's hidden states [B, T, D] -> float32 logits [B, T, V]."""
        return jnp.einsum("BTD,DV->BTV", self.final_norm(hidden), self.head_dv[...],
                          preferred_element_type=jnp.float32)
