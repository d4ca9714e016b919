"""attend(): attention of a block of queries against a cached prefix plus the block itself.

Every decoding mode goes through this one function. The prefix is one layer of the stacked KV
cache with a per-row valid length; the block's own keys are passed separately, with the in-block
pattern (causal or bidirectional) chosen by a traced flag so that one compiled program serves both.

Two implementations, chosen once per program by `nld_jax.kernels.Kernels` (which takes
`NLDModel.attention_impl` into account) and passed down as `kernel`:
- XLA (kernel=False): plain jnp, every backend, every dtype, explicit block masks.
- the Mosaic-GPU kernel `pallas_kernels.block_attention` (kernel=True): Hopper, bf16, head_dim a
  multiple of 64, with a KV cache and a causal or bidirectional block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nld_jax.cache import KVCache
from nld_jax.sharding import Layout, heads_on_shards

__all__ = ["attend"]

# A finite "minus infinity": a fully masked score row never occurs (every query sees at least
# itself), and finite values keep exp() free of NaN if one ever did.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q: jax.Array, k_block: jax.Array, v_block: jax.Array, *, cache: KVCache | None = None,
           layer: jax.Array | int = 0, causal: jax.Array | bool = True,
           block_mask: jax.Array | None = None, kernel: bool = False,
           quadratic: int = 0, layout: Layout | None = None) -> jax.Array:
    """Softmax attention of a block against [cached prefix ++ block].

    Args:
      q: [B, T, N, H] queries, already rotated and scaled by the Llama-4 factor.
      k_block, v_block: [B, T, K, H] the block's own keys and values.
      cache: the stacked KV cache ([L, B, S, K, H]; slots [0, cache.lengths[b]) valid), or None
        for no prefix.
      layer: int (may be traced): which layer of the cache is this one's prefix.
      causal: bool scalar (may be traced): in-block causal if True, else bidirectional.
      block_mask: bool [T, T] or [B, T, T] (query, key): an explicit in-block pattern that
        replaces `causal` (the training objective's two-stream mask; XLA only).
      kernel: static; run the Pallas kernel (see the module docstring).
      quadratic: static; b > 0 on the kernel: the block is quadratic self-speculation's
        b*(b+1) tokens and the kernel computes that pattern itself (the XLA path takes it as
        `block_mask`).
      layout: the model's mesh and rules: on a mesh of several devices the kernel runs on each
        device's heads and rows (nld_jax.sharding.heads_on_shards).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if kernel:
        from pallas_kernels.block_attention import block_attention

        if layout is not None and layout.mesh.size > 1:
            return heads_on_shards(layout, functools.partial(block_attention,
                                                             quadratic=quadratic),
                                   q, cache.k, cache.v, cache.lengths, k_block, v_block, causal,
                                   layer)
        return block_attention(q, cache.k, cache.v, cache.lengths, k_block, v_block, causal,
                               layer=layer, quadratic=quadratic)
    b, t, n, h = q.shape
    kv_heads = k_block.shape[2]
    if n % kv_heads:
        raise ValueError(f"query heads {n=} must be a multiple of KV heads {kv_heads=}")
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h) * jnp.asarray(h ** -0.5, q.dtype)

    # In-block mask [T, T]: key j visible to query i iff j <= i, or always when bidirectional.
    if block_mask is None:
        idx = jnp.arange(t)
        block_mask = jnp.logical_or(idx[None, :] <= idx[:, None], jnp.logical_not(causal))
    block_mask = jnp.broadcast_to(block_mask, (b, t, t))
    scores = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k_block, preferred_element_type=jnp.float32)
    scores = jnp.where(block_mask[:, :, None, None, :], scores, _MASKED)
    values = v_block
    if cache is not None:
        k_prefix = jax.lax.dynamic_index_in_dim(cache.k, layer, axis=0, keepdims=False)
        v_prefix = jax.lax.dynamic_index_in_dim(cache.v, layer, axis=0, keepdims=False)
        prefix_scores = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k_prefix,
                                   preferred_element_type=jnp.float32)
        valid = jnp.arange(k_prefix.shape[1])[None, :] < cache.lengths[:, None]  # [B, S]
        prefix_scores = jnp.where(valid[:, None, None, None, :], prefix_scores, _MASKED)
        scores = jnp.concatenate([prefix_scores, scores], axis=-1)
        values = jnp.concatenate([v_prefix, v_block.astype(v_prefix.dtype)], axis=1)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("BTKGS,BSKH->BTKGH", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
