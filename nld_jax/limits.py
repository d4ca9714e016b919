"""Resource limits of a generate() call, checked before anything is compiled.

A call needs its KV cache (2 x L x B x S x K x H elements, for the whole program) plus, at its
peak, the biggest activation of one layer of one forward: the attention scores where the XLA
path materialises them (float32 [B, N, T, S + T]; a flash kernel keeps them in tiles), the MLP's
hidden (3 x [B, T, F]) or the float32 logits of the rows that need them ([B, T, V]). That sum is
compared with the memory the device has free (an accelerator's allocator limit minus what is in
use; on CPU, the host's available memory) and a call that cannot fit is refused with the figures
instead of running out of memory, or swapping, after minutes of compilation.

The estimate leaves out what is already resident (the weights) and XLA's smaller temporaries,
so it is a floor: a call refused by it would certainly not fit. Under a mesh (a model sharded by
nld_jax.sharding) every figure is one device's share: the cache split over kv heads and batch
rows, the scores over query heads, the MLP hidden over its units, the logits over the
vocabulary, each as the layout's rules place them (the weights, resident, are already split).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from nld_jax.config import NLDConfig
from nld_jax.sharding import Layout

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
                    forwards: dict[str, tuple[int, bool]],
                    layout: Layout | None = None) -> MemoryEstimate:
    """The cache and the biggest one-layer activation of a call (on each device of a mesh).

    Args:
      config: the network.
      dtype: parameters' and activations' dtype (the cache's too).
      batch: B, rows in the call.
      capacity: S, the cache slots.
      forwards: {name: (T, scores materialised)} for each kind of forward: the tokens it runs
        (the prefill's padded prompt, a decode step's block; each may need logits for all its
        rows), and whether its attention runs on XLA (scores [B, N, T, S + T] in memory)
        rather than in a flash kernel's tiles.
      layout: the model's mesh and sharding rules (None: one device).
    """
    itemsize = jnp.dtype(dtype).itemsize
    c = config

    def local(logical: str, size: int) -> int:
        """One device's part of a dimension of `size` placed by the `logical` axis' rule."""
        mesh_axis = None if layout is None else dict(layout.rules)[logical]
        return size if mesh_axis is None else -(-size // layout.mesh.shape[mesh_axis])

    rows = local("batch", batch)
    cache = 2 * c.num_hidden_layers * rows * capacity * local("kv_heads", c.num_key_value_heads) \
        * c.head_dim * itemsize
    candidates = {}
    for name, (tokens, scores_materialised) in forwards.items():
        if scores_materialised:
            candidates[f"attention scores of the {name} (T={tokens}, S={capacity})"] = \
                rows * local("q_heads", c.num_attention_heads) * tokens * (capacity + tokens) * 4
        candidates[f"MLP hidden of the {name} (T={tokens})"] = \
            3 * rows * tokens * local("mlp", c.intermediate_size) * itemsize
        candidates[f"logits of the {name} (T={tokens})"] = \
            rows * tokens * local("vocab", c.vocab_size) * 4
    activation = max(candidates, key=candidates.__getitem__)
    return MemoryEstimate(cache_bytes=cache, activation_bytes=candidates[activation],
                          activation=activation)


def available_memory(device: jax.Device | None = None,
                     host_sharers: int = 1) -> tuple[int | None, str]:
    """(free bytes, where the figure comes from) on `device` (default: the first local one);
    None when nothing can tell. Devices without their own memory (CPU) share the host's:
    `host_sharers` of them (a mesh's local devices) each get that share of it."""
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    except jax.errors.JaxRuntimeError:  # a device of a compile-only topology (nld_jax.aot)
        return None, f"unknown: {device} is not addressable"
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return free, f"free on {device.device_kind}"
    share = "" if host_sharers == 1 else f" (1/{host_sharers}: one device's share)"
    try:  # CPU: the host's memory that can be had without swapping
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
        return free // host_sharers, "available on this host" + share
    except (OSError, KeyError, ValueError):
        pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total // host_sharers, "of host memory" + share
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
        f"{free / _GIB:.2f} GiB {where}; use fewer prompts, more devices, a smaller "
        f"max_new_tokens or max_cache_len, or a smaller block_size")
