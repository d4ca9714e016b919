"""jnp reference of block_attention: same signature, plain XLA, float32 math."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["block_attention_ref"]


def block_attention_ref(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                        lengths: jax.Array, k_block: jax.Array, v_block: jax.Array,
                        causal: jax.Array | bool, layer: jax.Array | int = 0,
                        config: object = None) -> jax.Array:
    """Attention of a block against [cache[:lengths] ++ block], in float32.

    Args:
      q: [B, T, N, H] queries (rotated; the softmax scale H**-0.5 is applied here).
      k_cache, v_cache: [L, B, S, K, H] the stacked KV cache; slots >= lengths[b] are ignored.
      lengths: int32 [B] valid cache length per row.
      k_block, v_block: [B, T, K, H] the block's own keys and values.
      causal: bool: in-block causal (True) or bidirectional (False).
      layer: int: the cache layer to read.
      config: unused (the kernel's tuning config).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    del config
    k_cache, v_cache = k_cache[layer], v_cache[layer]
    b, t, n, h = q.shape
    kv = k_block.shape[2]
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, t, kv, n // kv, h) * h ** -0.5
    s_prefix = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k_cache.astype(f32))
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]
    s_prefix = jnp.where(valid[:, None, None, None, :], s_prefix, -jnp.inf)
    s_block = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k_block.astype(f32))
    idx = jnp.arange(t)
    in_block = (idx[None, :] <= idx[:, None]) | ~jnp.asarray(causal)
    s_block = jnp.where(in_block[None, :, None, None, :], s_block, -jnp.inf)
    probs = jax.nn.softmax(jnp.concatenate([s_prefix, s_block], axis=-1), axis=-1)
    values = jnp.concatenate([v_cache, v_block], axis=1).astype(f32)
    out = jnp.einsum("BTKGS,BSKH->BTKGH", probs, values)
    return out.reshape(b, t, n, h).astype(q.dtype)
