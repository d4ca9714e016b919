"""Token selection: greedy, temperature, top-k and top-p, all inside jit.

Temperature and top-p are traced (changing them does not recompile); top-k is static because
`lax.top_k` needs a static k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sample_tokens", "is_eos"]


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, *, top_k: int = 0,
                  top_p: jax.Array | float = 1.0) -> jax.Array:
    """Picks one token per row.

    Args:
      logits: float32 [..., V].
      rng: a PRNG key.
      temperature: float scalar; 0 means argmax (greedy).
      top_k: keep the k most likely tokens before sampling (0: off).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: off).
    Returns:
      int32 [...].
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
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

    scaled = jax.lax.cond(jnp.asarray(top_p) < 1.0, nucleus, lambda x: x, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """bool, same shape as tokens: the token is one of the EOS ids."""
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))
