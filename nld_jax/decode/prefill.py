"""Prefill: one causal forward over the (right-padded) prompts writes the KV cache."""

from __future__ import annotations

import jax

from nld_jax.cache import KVCache
from nld_jax.model import NLDModel

__all__ = ["prefill"]


def prefill(model: NLDModel, prompts: jax.Array, prompt_lengths: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs the prompts through the network and leaves them in the cache.

    Args:
      prompts: int32 [B, P], each row right-padded after prompt_lengths[b] tokens. Padding sits
        after the real tokens, so under the causal pattern no real token sees it; its cache slots
        stay past the valid length and are overwritten by the first generated block.
      prompt_lengths: int32 [B], >= 1.
      cache: an empty cache (not read: the prompts attend only to themselves).
    Returns:
      (float32 [B, V] logits of each row's last prompt token, the cache with lengths set).
    """
    logits, cache = model.forward_block(prompts, cache, causal=True, write=True,
                                        logits_index=prompt_lengths - 1, read_cache=False)
    return logits[:, 0], cache.with_lengths(prompt_lengths)
