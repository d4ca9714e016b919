"""Which Pallas kernels a program runs, decided once per program, and the greedy step kernels.

`Kernels.choose` takes the model's `attention_impl` ("auto" | "xla" | "pallas") and the program's
shapes and returns what the decode loop uses:
- `attention`: every forward against the cache without an explicit block mask attends with
  `pallas_kernels.block_attention` where that module's `unsupported_reason` allows;
- `step`: the block modes run their greedy per-step work on `pallas_kernels.block_step`
  (`greedy_commit` for a diffusion denoise step, `greedy_verify` for a self-spec verify pass):
  the vocabulary a multiple of 256, a block of at most 64 positions.
"auto" uses each kernel where its shapes fit on a Hopper GPU, XLA otherwise; "pallas" forces them
and raises NotImplementedError naming the reason where one cannot run; "xla" uses none.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.config import NLDConfig
from nld_jax.sharding import Layout, heads_on_shards_unsupported_reason

__all__ = ["IMPLEMENTATIONS", "Kernels", "on_hopper", "step_unsupported_reason", "greedy_commit",
           "greedy_verify"]

IMPLEMENTATIONS = ("auto", "xla", "pallas")
_BLOCK_V = 256
_MAX_T = 64


def on_hopper() -> bool:
    """The default device is an NVIDIA GPU of compute capability 9.x (H100, H200)."""
    device = jax.local_devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9")


def step_unsupported_reason(vocab_size: int, block_size: int) -> str | None:
    """Why the step kernels cannot serve these shapes (None if they can)."""
    if vocab_size % _BLOCK_V:
        return f"vocab_size={vocab_size} is not a multiple of {_BLOCK_V}"
    if block_size > _MAX_T:
        return f"block_size={block_size} exceeds {_MAX_T}"
    return None


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels one program runs (static: part of the program's identity)."""

    attention: bool = False
    step: bool = False

    @classmethod
    def choose(cls, requested: str, *, config: NLDConfig, dtype: jnp.dtype, capacity: int,
               block_size: int | None, layout: Layout | None = None, batch: int = 1
               ) -> Kernels:
        """The kernels for a program of these shapes under `requested` (see the module doc).

        `block_size` None: the mode has no greedy step work (AR), so no step kernel is asked for.
        `layout`: the model's mesh and rules; on several devices the attention kernel runs on
        each device's heads and `batch` rows (shard_map), and the step kernels, which read
        whole vocabulary rows, are not used.
        """
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={requested!r}; expected one of {IMPLEMENTATIONS}")
        if requested == "xla":
            return cls()
        from pallas_kernels.block_attention import unsupported_reason

        n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        reasons = dict(attention=unsupported_reason(
            jax.ShapeDtypeStruct((1, 1, n, h), dtype),
            jax.ShapeDtypeStruct((config.num_hidden_layers, 1, capacity, k, h), dtype)))
        if block_size is not None:
            reasons["step"] = step_unsupported_reason(config.vocab_size, block_size)
        if layout is not None and layout.mesh.size > 1:
            reasons["attention"] = reasons["attention"] or heads_on_shards_unsupported_reason(
                layout, batch)
            if "step" in reasons:
                reasons["step"] = "the model is sharded over several devices (the step " \
                                  "kernels read whole vocabulary rows of one device)"
        if requested == "pallas":
            for name, reason in reasons.items():
                if reason is not None:
                    raise NotImplementedError(
                        f"attention_impl='pallas': the {name} kernel cannot run: {reason}")
            return cls(attention=True, step=block_size is not None)
        hopper = on_hopper()
        return cls(**{name: hopper and reason is None for name, reason in reasons.items()})


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
