"""jnp references of the fused per-step kernels (same signatures as block_step.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["confidence_commit_ref", "verify_accept_ref"]


def confidence_commit_ref(logits: jax.Array, tokens: jax.Array, masked: jax.Array,
                          threshold: jax.Array | float, config: object = None
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One greedy denoise step's commit (spec/decoding.md section 2, threshold rule).

    Args:
      logits: float32 [B, T, V] of the bidirectional pass.
      tokens: int32 [B, T] the block.
      masked: bool [B, T] still-masked positions.
      threshold: commit masked positions whose argmax probability is >= threshold, and always
        the most confident masked position (lowest index on ties).
      config: unused.
    Returns:
      (tokens [B, T], masked [B, T], confidence float32 [B, T] of every position's argmax).
    """
    del config
    candidate = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    confidence = jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    masked_conf = jnp.where(masked, confidence, -jnp.inf)
    top1 = jnp.arange(tokens.shape[1])[None, :] == jnp.argmax(masked_conf, axis=1)[:, None]
    commit = masked & ((confidence >= threshold) | top1)
    return jnp.where(commit, candidate, tokens), masked & ~commit, confidence


def verify_accept_ref(logits: jax.Array, drafts: jax.Array, config: object = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy verification (spec/decoding.md section 3).

    Args:
      logits: float32 [B, T, V] of the causal verify pass (position i predicts i+1).
      drafts: int32 [B, T] the verified block [seed, d_1, ..., d_{T-1}].
      config: unused.
    Returns:
      (predicted int32 [B, T] argmax per position, accepted int32 [B] leading run of
      predicted[i] == drafts[i+1], bonus int32 [B] = predicted[accepted]).
    """
    del config
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    match = predicted[:, :-1] == drafts[:, 1:]
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    bonus = jnp.take_along_axis(predicted, accepted[:, None], axis=1)[:, 0]
    return predicted, accepted, bonus
