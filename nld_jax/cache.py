"""KVCache: preallocated keys and values of all layers, with a per-row valid length.

The cache only ever holds causal K/V of committed tokens at slots [0, lengths[b]). A forward reads
it and returns its block's K/V (a BlockKV); a caller that commits the block writes it at
[lengths[b], lengths[b] + T) with `write` (all layers at once) without advancing `lengths`: those
slots stay invalid (masked) until the decode loop advances the length, so rolling back a rejected
block is simply not advancing it, and the next block overwrites the slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["KVCache", "BlockKV"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockKV:
    """The K/V one forward computed for its block, every layer."""

    k: jax.Array  # [L, B, T, K, H]
    v: jax.Array  # [L, B, T, K, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, and the valid length of each row."""

    # row_axis: the batch axis, for decode.common.replace_rows.
    k: jax.Array = dataclasses.field(metadata=dict(row_axis=1))  # [L, B, S, K, H]
    v: jax.Array = dataclasses.field(metadata=dict(row_axis=1))  # [L, B, S, K, H]
    # int32 [B]: slots [0, lengths) hold committed causal K/V
    lengths: jax.Array = dataclasses.field(metadata=dict(row_axis=0))

    @classmethod
    def empty(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int,
              head_dim: int, dtype: jnp.dtype) -> KVCache:
        """A zeroed cache of `capacity` slots per row, all rows empty."""
        shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        """S: slots per row."""
        return self.k.shape[2]

    def write(self, block: BlockKV, at: jax.Array) -> KVCache:
        """The cache with `block` written at slots at[b]..at[b]+T of row b, in every layer.

        The valid lengths are unchanged (see `advance`). A write past the end is clamped by
        dynamic_update_slice, so callers size the cache with room for a whole block.
        """

        def one_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
            # row [L, S, K, H], new [L, T, K, H]
            return jax.lax.dynamic_update_slice_in_dim(row, new.astype(row.dtype), start, axis=1)

        write_rows = jax.vmap(one_row, in_axes=(1, 1, 0), out_axes=1)
        at = at.astype(jnp.int32)
        return dataclasses.replace(self, k=write_rows(self.k, block.k, at),
                                   v=write_rows(self.v, block.v, at))

    def advance(self, counts: jax.Array) -> KVCache:
        """Marks `counts[b]` more slots of row b valid (the ones the last block wrote)."""
        return dataclasses.replace(self, lengths=self.lengths + counts.astype(jnp.int32))

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """The same K/V with new valid lengths (a rollback or a prefill's true lengths)."""
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))
