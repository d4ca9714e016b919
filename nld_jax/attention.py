"""attend(): attention of a block of queries against a cached prefix plus the block itself.

Every decoding mode goes through this one function. The prefix is the KV cache with a per-row
valid length; the block's own keys are passed separately, with the in-block pattern (causal or
bidirectional) chosen by a traced flag so that one compiled program serves both.

Implementations (`NLDModel.attention_impl`, set by `load_model(..., attention_impl=...)`):
- "xla": plain jnp, every backend, every dtype.
- "pallas": the Mosaic-GPU kernel `pallas_kernels.block_attention` (Hopper, bf16, head_dim a
  multiple of 64, with a KV cache); anything else raises NotImplementedError naming the reason.
- "auto" (default): "pallas" where it applies (a Hopper GPU, bf16, a cache, no explicit
  training mask), "xla" otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attend", "IMPLEMENTATIONS", "resolve_impl", "on_hopper"]

IMPLEMENTATIONS = ("auto", "xla", "pallas")

# A finite "minus infinity": a fully masked score row never occurs (every query sees at least
# itself), and finite values keep exp() free of NaN if one ever did.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def on_hopper() -> bool:
    """The default device is an NVIDIA GPU of compute capability 9.x (H100, H200)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9")


def _pallas_unsupported(q: jax.Array, k_prefix: jax.Array | None,
                        block_mask: jax.Array | None) -> str | None:
    """Why the kernel cannot run this call (None if it can)."""
    if q.dtype != jnp.bfloat16:
        return f"the kernel takes bfloat16, got {q.dtype}"
    if q.shape[-1] % 64:
        return f"head_dim={q.shape[-1]} is not a multiple of 64"
    if k_prefix is None:
        return "there is no KV cache (a full-sequence forward)"
    if k_prefix.shape[1] % 64:
        return f"cache slots S={k_prefix.shape[1]} are not a multiple of 64"
    if block_mask is not None:
        return "an explicit block mask (the training objective) is not a kernel pattern"
    return None


def resolve_impl(requested: str, q: jax.Array, k_prefix: jax.Array | None,
                 block_mask: jax.Array | None) -> str:
    """The implementation a call runs: the requested one, or auto's documented choice."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={requested!r}; expected one of {IMPLEMENTATIONS}")
    reason = _pallas_unsupported(q, k_prefix, block_mask)
    if requested == "pallas":
        if reason is not None:
            raise NotImplementedError(f"attention impl='pallas' cannot run: {reason}")
        return "pallas"
    if requested == "auto":
        return "pallas" if reason is None and on_hopper() else "xla"
    return "xla"


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
      impl: "auto", "xla" or "pallas" (see the module docstring).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if resolve_impl(impl, q, k_prefix, block_mask) == "pallas":
        from pallas_kernels.block_attention import block_attention

        # The kernel reads the stacked [L, B, S, K, H] cache; this layer's cache is L = 1.
        return block_attention(q, k_prefix[None], v_prefix[None], prefix_lengths, k_block,
                               v_block, causal)
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
