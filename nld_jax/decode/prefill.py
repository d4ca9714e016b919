"""Prefill: causal forwards over the (right-padded) prompts write the KV cache, chunk by chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from nld_jax.cache import KVCache

if TYPE_CHECKING:  # common.start calls prefill: importing Context at run time would be circular
    from nld_jax.decode.common import Context

__all__ = ["prefill"]


def prefill(ctx: Context, prompts: jax.Array, prompt_lengths: jax.Array, cache: KVCache,
            chunk: int | None = None, images: tuple[jax.Array, jax.Array] | None = None
            ) -> tuple[jax.Array, KVCache]:
    """Runs the prompts through the network and leaves them in the cache.

    Args:
      prompts: int32 [B, P], each row right-padded after prompt_lengths[b] tokens. Padding sits
        after the real tokens, so under the causal pattern no real token sees it; its cache slots
        stay past the valid length and are overwritten by the first generated block.
      prompt_lengths: int32 [B], >= 1.
      cache: an empty cache of at least P slots.
      chunk: static. None, or P <= chunk: one forward over the prompts (the XLA path attends to
        the prompts alone; the attention kernel reads this cache with no valid slot). Otherwise
        P must be a multiple of chunk: the prompts go through the cached forward `chunk` tokens
        at a time, each chunk attending to the K/V the earlier ones wrote, so activations are
        O(chunk x S) instead of O(P^2); only the chunks up to the longest prompt run.
      images: (features [F, D], feature_index [B, P]) of a VLM's prompt images (their rows
        replace the <|image_pad|> embeddings).
    Returns:
      (the last layer's hidden state [B, 1, D] at each row's last prompt token, the cache holding
      the prompts with its lengths set).
    """
    b, p = prompts.shape
    if chunk is None or p <= chunk:
        hidden, block_kv = ctx.forward(prompts, cache if ctx.kernels.attention else None,
                                       causal=True, images=images)
        # Only the last prompt token's logits are needed: [B, P, V] would dwarf the weights.
        last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)
        cache = cache.write(block_kv, jnp.zeros_like(prompt_lengths))
        return last, cache.with_lengths(prompt_lengths)
    if p % chunk:
        raise ValueError(f"prompt width {p} must be a multiple of {chunk=}")

    def one_chunk(i: jax.Array, carry: tuple[KVCache, jax.Array]) -> tuple[KVCache, jax.Array]:
        cache, last = carry
        begin = jnp.full((b,), i * chunk, jnp.int32)
        tokens = jax.lax.dynamic_slice_in_dim(prompts, i * chunk, chunk, axis=1)
        chunk_images = None if images is None else (
            images[0], jax.lax.dynamic_slice_in_dim(images[1], i * chunk, chunk, axis=1))
        # Every row reads the slots the earlier chunks wrote: a short row's padding is only
        # ever seen by its own later padding, never by a real token.
        reading = cache.with_lengths(begin)
        hidden, block_kv = ctx.forward(tokens, reading, causal=True, images=chunk_images)
        offset = prompt_lengths - 1 - begin  # each row's last prompt token, within this chunk
        here = (offset >= 0) & (offset < chunk)
        picked = jnp.take_along_axis(hidden, jnp.clip(offset, 0, chunk - 1)[:, None, None],
                                     axis=1)
        return cache.write(block_kv, begin), jnp.where(here[:, None, None], picked, last)

    num_chunks = (jnp.max(prompt_lengths) + chunk - 1) // chunk
    last = jnp.zeros((b, 1, ctx.model.config.hidden_size), ctx.model.dtype)
    cache, last = jax.lax.fori_loop(0, num_chunks, one_chunk, (cache, last))
    return last, cache.with_lengths(prompt_lengths)
