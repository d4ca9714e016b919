"""Resource limits of a generate() call, checked before anything is compiled.

A call needs its KV cache (2 x L x B x S x K x H elements, for the whole program) plus, at its
peak, the biggest activation of one layer of one forward: the attention scores where the XLA
path materialises them (float32 [B, N, T, S + T]; a flash kernel keeps them in tiles), the MLP's
hidden (3 x [B, T, F]) or the float32 logits of the rows that need them ([B, T, V]). That sum is
compared with the memory the device has free (an accelerator's allocator limit minus what is in
use; on CPU, the host's available memory) and a call that cannot fit is refused with the figures
instead of running out of memory, or swapping, after minutes of compilation.

The estimate leaves out what is already resident (the weights) and XLA's smaller temporaries,
so it is a floor: a call refused by it would certainly not fit.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from nld_jax.config import NLDConfig

__all__ = ["ResourceLimitError", "MemoryEstimate", "estimate_memory", "available_memory",
           "check_memory"]

_GIB = 1 << 30


class ResourceLimitError(ValueError):
    """A request larger than a stated limit (a mode's largest block, the device's memory)."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What one generate() call needs at its peak, in bytes."""

    cache_bytes: int
    activation_bytes: int
    activation: str  # which activation is the biggest, and where

    @property
    def total_bytes(self) -> int:
        return self.cache_bytes + self.activation_bytes


def estimate_memory(config: NLDConfig, dtype: jnp.dtype, *, batch: int, capacity: int,
                    forwards: dict[str, tuple[int, bool]]) -> MemoryEstimate:
    """The cache and the biggest one-layer activation of a call.

    Args:
      config: the network.
      dtype: parameters' and activations' dtype (the cache's too).
      batch: B, rows in the call.
      capacity: S, the cache slots.
      forwards: {name: (T, scores materialised)} for each kind of forward: the tokens it runs
        (the prefill's padded prompt, a decode step's block; each may need logits for all its
        rows), and whether its attention runs on XLA (scores [B, N, T, S + T] in memory)
        rather than in a flash kernel's tiles.
    """
    itemsize = jnp.dtype(dtype).itemsize
    c = config
    cache = 2 * c.num_hidden_layers * batch * capacity * c.num_key_value_heads * c.head_dim \
        * itemsize
    candidates = {}
    for name, (tokens, scores_materialised) in forwards.items():
        if scores_materialised:
            candidates[f"attention scores of the {name} (T={tokens}, S={capacity})"] = \
                batch * c.num_attention_heads * tokens * (capacity + tokens) * 4
        candidates[f"MLP hidden of the {name} (T={tokens})"] = \
            3 * batch * tokens * c.intermediate_size * itemsize
        candidates[f"logits of the {name} (T={tokens})"] = batch * tokens * c.vocab_size * 4
    activation = max(candidates, key=candidates.__getitem__)
    return MemoryEstimate(cache_bytes=cache, activation_bytes=candidates[activation],
                          activation=activation)


def available_memory(device: jax.Device | None = None) -> tuple[int | None, str]:
    """(free bytes, where the figure comes from); None when nothing can tell."""
    device = jax.local_devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return free, f"free on {device.device_kind}"
    try:  # CPU: the host's memory that can be had without swapping
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "available on this host"
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of host memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_memory(estimate: MemoryEstimate, available: tuple[int | None, str]) -> None:
    """ResourceLimitError with the figures if the estimate exceeds the free memory."""
    free, where = available
    if free is None or estimate.total_bytes <= free:
        return
    raise ResourceLimitError(
        f"this call needs at least {estimate.total_bytes / _GIB:.2f} GiB (KV cache "
        f"{estimate.cache_bytes / _GIB:.2f} GiB + the biggest activation "
        f"{estimate.activation_bytes / _GIB:.2f} GiB: {estimate.activation}), more than the "
        f"{free / _GIB:.2f} GiB {where}; use fewer prompts, a smaller max_new_tokens or "
        f"max_cache_len, or a smaller block_size")
