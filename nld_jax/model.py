"""The NLD network (a Ministral-3 decoder) in Flax NNX.

One network, two attention patterns: `model(tokens)` is causal (AR), `model(tokens, causal=False)`
is fully bidirectional (diffusion). Decoding modes use `forward_block`, which runs a block of T
tokens at absolute positions L..L+T-1 against a KV cache.

Shape letters: B batch, T tokens in this forward, S cache slots, D model dim, N query heads,
K KV heads, G = N/K, H head_dim, F MLP hidden, V vocab, R LoRA rank.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nld_jax.attention import attend, resolve_impl
from nld_jax.cache import KVCache, write_block
from nld_jax.config import NLDConfig

__all__ = ["NLDModel", "rope_inv_freq"]


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype,
            std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


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
        self.q_dnh = nnx.Param(_normal(rngs, (d, n, h), dtype))
        self.k_dkh = nnx.Param(_normal(rngs, (d, k, h), dtype))
        self.v_dkh = nnx.Param(_normal(rngs, (d, k, h), dtype))
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

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, *, cache_k: jax.Array | None,
                 cache_v: jax.Array | None, cache_lengths: jax.Array | None,
                 causal: jax.Array | bool, lora_on: jax.Array | bool,
                 attention_impl: str, block_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = jnp.einsum("BTD,DNH->BTNH", x_btd, self.q_dnh[...])
        k = jnp.einsum("BTD,DKH->BTKH", x_btd, self.k_dkh[...])
        v = jnp.einsum("BTD,DKH->BTKH", x_btd, self.v_dkh[...])
        q, k = self._rotate(q, positions_bt), self._rotate(k, positions_bt)
        beta = self.config.llama_4_scaling_beta
        if beta is not None:
            orig = self.config.original_max_position_embeddings
            floor = jnp.floor(positions_bt.astype(jnp.float32) / orig)
            q_scale = 1.0 + beta * jnp.log(1.0 + floor)
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        attn = attend(q, k, v, k_prefix=cache_k, v_prefix=cache_v, prefix_lengths=cache_lengths,
                      causal=causal, block_mask=block_mask, impl=attention_impl)
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
        self.gate_df = nnx.Param(_normal(rngs, (d, f), dtype))
        self.up_df = nnx.Param(_normal(rngs, (d, f), dtype))
        self.down_fd = nnx.Param(_normal(rngs, (f, d), dtype))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate = jnp.einsum("BTD,DF->BTF", x_btd, self.gate_df[...])
        up = jnp.einsum("BTD,DF->BTF", x_btd, self.up_df[...])
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_fd[...])


class DecoderLayer(nnx.Module):
    """Pre-norm: h + attn(norm(h)), then x + mlp(norm(x))."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)


class NLDModel(nnx.Module):
    """The Nemotron-Labs-Diffusion network: one set of weights, causal or bidirectional."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype | str = jnp.bfloat16,
                 rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise ValueError(f"{dtype=} is not supported; use bfloat16 or float32")
        self.config = config
        self.dtype = dtype
        self.embed_vd = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.head_dv = nnx.Param(_normal(rngs, (config.hidden_size, config.vocab_size), dtype))
        self.attention_impl = "auto"  # see nld_jax.attention

    @property
    def has_lora(self) -> bool:
        """Whether the LinearSpec draft adapter is attached."""
        return self.layers[0].attn.lora is not None

    def attach_lora(self, rank: int, scale: float, *, rngs: nnx.Rngs) -> None:
        """Adds a fresh (zero-B) o_proj LoRA adapter to every layer."""
        for layer in self.layers:
            layer.attn.lora = nnx.data(OProjLoRA(self.config, rank, scale, dtype=self.dtype,
                                                 rngs=rngs))

    def __call__(self, tokens: jax.Array, causal: bool = True) -> jax.Array:
        """Full-sequence logits.

        Args:
          tokens: int [B, T] at positions 0..T-1.
          causal: True for the AR pattern, False for every position attending to every position.
        Returns:
          float32 [B, T, V].
        """
        logits, _ = self.forward_block(tokens, None, causal=causal)
        return logits

    def forward_block(self, tokens: jax.Array, cache: KVCache | None, *,
                      causal: jax.Array | bool, write: jax.Array | bool = False,
                      lora_on: jax.Array | bool = False, logits_index: jax.Array | None = None,
                      read_cache: bool = True, positions: jax.Array | None = None,
                      block_mask: jax.Array | None = None,
                      return_hidden: bool = False) -> tuple[jax.Array, KVCache | None]:
        """A block of T tokens at positions cache.lengths[b] + (0..T-1) against the cache.

        Args:
          tokens: int [B, T].
          cache: the KV cache (None: no prefix, positions 0..T-1).
          causal: bool (may be traced): causal within the block, else bidirectional.
          write: bool (may be traced): write the block's K/V at slots [L, L+T). The valid
            lengths are never advanced here; the caller advances them on commit.
          lora_on: bool (may be traced), or bool [B, T] per token: apply the draft adapter.
          logits_index: int [B]: compute logits only at this block position of each row (a
            prefill needs one position, and [P, V] logits would dwarf the weights).
          read_cache: static; False attends to the block alone (a prefill into an empty cache).
          positions: int [B, T] RoPE positions overriding L + (0..T-1) (training).
          block_mask: bool [T, T] or [B, T, T] in-block pattern overriding `causal` (training,
            quadratic self-speculation).
          return_hidden: static; return the last layer's hidden states [B, T, D] instead of
            logits, for a caller that needs `logits()` of only some positions.
        Returns:
          (float32 logits [B, T, V] (or [B, 1, V] with logits_index; or hidden states), the cache
          with the block written or untouched).
        """
        b, t = tokens.shape
        starts = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
        if positions is None:
            positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        h = jnp.take(self.embed_vd[...], tokens, axis=0)
        prefix_lengths = None if cache is None else cache.lengths
        if cache is not None and not read_cache:
            # The XLA path attends to the block alone; the kernel needs a cache, so it gets
            # this one with no valid slot (it then reads no prefix tile at all).
            probe = jax.ShapeDtypeStruct((b, t, 1, self.config.head_dim), self.dtype)
            kernel = resolve_impl(self.attention_impl, probe, cache.k[0], block_mask)
            read_cache = kernel == "pallas"
            prefix_lengths = jnp.zeros_like(cache.lengths)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                attn_out, k, v = layer.attn(
                    layer.input_norm(h), positions,
                    cache_k=cache.k[i] if cache is not None and read_cache else None,
                    cache_v=cache.v[i] if cache is not None and read_cache else None,
                    cache_lengths=prefix_lengths,
                    causal=causal, lora_on=lora_on, attention_impl=self.attention_impl,
                    block_mask=block_mask)
                x = h + attn_out
                h = x + layer.mlp(layer.post_attn_norm(x))
                if cache is not None:
                    new_k.append(write_block(cache.k[i], k, cache.lengths, write))
                    new_v.append(write_block(cache.v[i], v, cache.lengths, write))
        if logits_index is not None:
            h = jnp.take_along_axis(h, logits_index[:, None, None].astype(jnp.int32), axis=1)
        out = h if return_hidden else self.logits(h)
        if cache is None:
            return out, None
        return out, KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The last layer's hidden states [B, T, D] -> float32 logits [B, T, V]."""
        return jnp.einsum("BTD,DV->BTV", self.final_norm(hidden), self.head_dv[...],
                          preferred_element_type=jnp.float32)
