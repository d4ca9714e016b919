"""Token selection: greedy, temperature, top-k and top-p, all inside jit.

Temperature and top-p are traced (changing them does not recompile); top-k is static because
`lax.top_k` needs a static k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["filter_logits", "sample_tokens", "is_eos", "leading_run"]


def filter_logits(logits: jax.Array, temperature: jax.Array, *, top_k: int = 0,
                  top_p: jax.Array | float = 1.0) -> jax.Array:
    """The sampling distribution's logits: logits / temperature, with top-k/top-p cut to -inf.

    Args:
      logits: float [..., V].
      temperature: float scalar > 0 (a 0 is treated as a tiny temperature).
      top_k: keep the k most likely tokens (0: off).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: off).
    Returns:
      float32 [..., V]; softmax of it is the distribution tokens are drawn from.
    """
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)

    def nucleus(x: jax.Array) -> jax.Array:
        sorted_desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep a token while the mass before it is still short of top_p (the top-1 always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
        cutoff = jnp.min(kept, axis=-1, keepdims=True)
        return jnp.where(x < cutoff, -jnp.inf, x)

    return jax.lax.cond(jnp.asarray(top_p) < 1.0, nucleus, lambda x: x, scaled)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, *, top_k: int = 0,
                  top_p: jax.Array | float = 1.0) -> jax.Array:
    """Picks one token per row: argmax at temperature 0, else a draw from filter_logits().

    Args:
      logits: float32 [..., V].
      rng: a PRNG key.
      temperature: float scalar; 0 means argmax (greedy).
      top_k, top_p: see filter_logits.
    Returns:
      int32 [...].
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k=top_k, top_p=top_p)
    sampled = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """bool, same shape as tokens: the token is one of the EOS ids (int32 [E])."""
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def leading_run(flags: jax.Array) -> jax.Array:
    """int32 [...]: how many leading entries along the last axis are True."""
    return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
