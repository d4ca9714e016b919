"""Pieces every decoding mode shares: the sampler settings, the budget, emitting tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.sampling import filter_logits, sample_tokens

__all__ = ["Sampler", "Budget", "emit"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are chosen; temperature and top_p are traced, top_k is static."""

    temperature: jax.Array  # float32 []: 0 = greedy
    top_p: jax.Array  # float32 []: 1 = off
    top_k: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0 = off

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return sample_tokens(logits, rng, self.temperature, top_k=self.top_k, top_p=self.top_p)

    def log_probs(self, logits: jax.Array) -> jax.Array:
        """float32 [..., V]: log of the distribution tokens are drawn from at temperature > 0."""
        filtered = filter_logits(logits, self.temperature, top_k=self.top_k, top_p=self.top_p)
        return jax.nn.log_softmax(filtered, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Budget:
    """When a row stops."""

    max_new_tokens: jax.Array  # int32 []: traced, so budgets in one bucket share a program
    eos_ids: jax.Array  # int32 [E]: any of these ends a row (traced: no recompile per EOS set)


def emit(tokens: jax.Array, num_tokens: jax.Array, new: jax.Array,
         counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Appends new[b, :counts[b]] to row b of the output buffer.

    Args:
      tokens: int32 [B, O] the output buffer.
      num_tokens: int32 [B] tokens already in each row.
      new: int32 [B, C] candidates.
      counts: int32 [B] how many of them to append (0..C).
    Returns:
      (the buffer, the new counts).
    """
    c = new.shape[1]
    offsets = jnp.arange(c, dtype=jnp.int32)[None, :]
    # Slots past a row's count point beyond the buffer and are dropped.
    index = jnp.where(offsets < counts[:, None], num_tokens[:, None] + offsets, tokens.shape[1])
    rows = jnp.arange(tokens.shape[0])[:, None]
    return tokens.at[rows, index].set(new, mode="drop"), num_tokens + counts
