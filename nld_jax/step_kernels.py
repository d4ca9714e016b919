"""The greedy per-step work of the block modes on the fused Pallas kernels.

`greedy_commit` (a diffusion denoise step, threshold rule) and `greedy_verify` (a self-spec
verify pass) run `pallas_kernels.block_step`. The decode loops use them at temperature 0 when
`use_step_kernels` says so: the model's attention implementation resolves to the kernels (see
nld_jax.attention) and the shapes fit; the loops' own XLA code runs otherwise. Forcing
`attention_impl="pallas"` on shapes the kernels cannot take raises instead of falling back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nld_jax.attention import on_hopper

__all__ = ["use_step_kernels", "greedy_commit", "greedy_verify"]

_BLOCK_V = 256
_MAX_T = 64


def use_step_kernels(impl: str, vocab_size: int, block_size: int) -> bool:
    """Whether the block modes run their greedy step on the kernels (a static decision)."""
    reason = None
    if vocab_size % _BLOCK_V:
        reason = f"vocab_size={vocab_size} is not a multiple of {_BLOCK_V}"
    elif block_size > _MAX_T:
        reason = f"block_size={block_size} exceeds {_MAX_T}"
    if impl == "pallas":
        if reason is not None:
            raise NotImplementedError(f"step kernels cannot run: {reason}")
        return True
    return impl == "auto" and reason is None and on_hopper()


def greedy_commit(logits: jax.Array, tokens: jax.Array, masked: jax.Array,
                  threshold: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threshold + top-1 commit of one greedy denoise step on the kernel, for active rows.

    Args:
      logits: float32 [B, T, V].
      tokens: int32 [B, T] the block.
      masked: bool [B, T].
      threshold: float32 [].
      active: bool [B]: rows still refining (others are returned unchanged).
    Returns:
      (tokens, masked).
    """
    from pallas_kernels.block_step import confidence_commit

    new_tokens, new_masked, _ = confidence_commit(logits, tokens, masked & active[:, None],
                                                  threshold)
    return new_tokens, jnp.where(active[:, None], new_masked, masked)


def greedy_verify(logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance on the kernel: (accepted drafts [B], bonus token [B])."""
    from pallas_kernels.block_step import verify_accept

    _, accepted, bonus = verify_accept(logits, drafts)
    return accepted, bonus
