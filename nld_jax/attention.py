"""attend(): attention of a block of queries against a cached prefix plus the block itself.

Every decoding mode goes through this one function, so a Pallas kernel can replace the XLA path
without touching the network. The prefix is the KV cache with a per-row valid length; the block's
own keys are passed separately, with the in-block pattern (causal or bidirectional) chosen by a
traced flag so that one compiled program serves both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attend", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("xla",)

# A finite "minus infinity": a fully masked score row never occurs (every query sees at least
# itself), and finite values keep exp() free of NaN if one ever did.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q: jax.Array, k_block: jax.Array, v_block: jax.Array, *,
           k_prefix: jax.Array | None = None, v_prefix: jax.Array | None = None,
           prefix_lengths: jax.Array | None = None, causal: jax.Array | bool = True,
           block_mask: jax.Array | None = None, impl: str = "xla") -> jax.Array:
    """Softmax attention of a block against [cached prefix ++ block].

    Args:
      q: [B, T, N, H] queries, already rotated and scaled by the Llama-4 factor.
      k_block, v_block: [B, T, K, H] the block's own keys and values.
      k_prefix, v_prefix: [B, S, K, H] the KV cache, or None for no prefix.
      prefix_lengths: int [B]: slots [0, prefix_lengths) of the prefix are valid.
      causal: bool scalar (may be traced): in-block causal if True, else bidirectional.
      block_mask: bool [T, T] or [B, T, T] (query, key): an explicit in-block pattern that
        replaces `causal` (the training objective's two-stream mask).
      impl: "xla" (plain jnp).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if impl != "xla":
        raise ValueError(f"attention {impl=} is not available; expected one of {IMPLEMENTATIONS}")
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
    if k_prefix is not None:
        assert v_prefix is not None and prefix_lengths is not None
        prefix_scores = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k_prefix,
                                   preferred_element_type=jnp.float32)
        valid = jnp.arange(k_prefix.shape[1])[None, :] < prefix_lengths[:, None]  # [B, S]
        prefix_scores = jnp.where(valid[:, None, None, None, :], prefix_scores, _MASKED)
        scores = jnp.concatenate([prefix_scores, scores], axis=-1)
        values = jnp.concatenate([v_prefix, v_block.astype(v_prefix.dtype)], axis=1)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("BTKGS,BSKH->BTKGH", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
