"""KVCache: preallocated per-layer K/V with a per-row valid length.

The cache only ever holds causal K/V of committed tokens at slots [0, lengths[b]). A forward may
write a block at [lengths[b], lengths[b] + T) without advancing `lengths`: those slots stay
invalid (masked) until the decode loop advances the length, so rolling back a rejected block is
simply not advancing it, and the next block overwrites the slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["KVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values, and the valid length of each row."""

    k: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    v: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    lengths: jax.Array  # int32 [B]: slots [0, lengths) hold committed causal K/V

    @classmethod
    def empty(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int,
              head_dim: int, dtype: jnp.dtype) -> KVCache:
        """A zeroed cache of `capacity` slots per row, all rows empty."""
        shape = (batch, capacity, num_kv_heads, head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        """S: slots per row."""
        return self.k[0].shape[1]

    def advance(self, counts: jax.Array) -> KVCache:
        """Marks `counts[b]` more slots of row b valid (the ones the last block wrote)."""
        return dataclasses.replace(self, lengths=self.lengths + counts.astype(jnp.int32))

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """The same K/V with new valid lengths (a rollback or a prefill's true lengths)."""
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def write_block(layer_cache: jax.Array, block: jax.Array, starts: jax.Array,
                write: jax.Array) -> jax.Array:
    """Writes `block` [B, T, K, H] into `layer_cache` [B, S, K, H] at slots starts[b]..+T.

    With `write` False the slots keep their old contents; selecting on the T-slot slice (not the
    whole cache) keeps that choice O(T) and lets XLA update the cache in place.
    """

    def one_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
        old = jax.lax.dynamic_slice_in_dim(row, start, new.shape[0], axis=0)
        return jax.lax.dynamic_update_slice_in_dim(row, jnp.where(write, new, old), start, axis=0)

    return jax.vmap(one_row)(layer_cache, block.astype(layer_cache.dtype), starts)
