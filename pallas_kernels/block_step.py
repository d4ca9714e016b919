"""The per-step vocabulary pass of block refinement and verification (Mosaic GPU, Hopper).

`vocab_stats` streams a block's logits [T, V] through shared memory once, keeping per position
an online max, sum of exponentials and argmax, so the softmax is never materialised. On it:

- `confidence_commit` (a greedy denoise step): confidence = softmax(logits)[argmax] = 1 / sum,
  then the threshold + always-commit-top-1 rule of spec/decoding.md section 2.
- `verify_accept` (a greedy verify pass): argmax per position, the leading run of agreements
  with the next draft, and the bonus token.

The rules over the T positions are a few XLA ops after the kernel: inside it they were
reductions across warps, whose scratch indexing ptxas reported as a potential out-of-bound
shared-memory access. One thread block per batch row; the T rows are copied into a 64-row tile
(one WGMMA layout); the vocabulary is read in `block_v`-wide tiles, double-buffered.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

__all__ = ["TuningConfig", "vocab_stats", "confidence_commit", "verify_accept"]

_ROWS = 64  # positions per thread block (one WGMMA-layout tile)
SMEM_LIMIT_BYTES = 227 * 1024
_BIG = 1 << 30


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Vocabulary tile width."""

    block_v: int = 256

    def __post_init__(self) -> None:
        if self.block_v % 64 or not 64 <= self.block_v <= 1024:
            raise ValueError(f"{self.block_v=} must be a multiple of 64 in [64, 1024]")
        if self.smem_bytes() > SMEM_LIMIT_BYTES:
            raise ValueError(f"{self.block_v=} needs {self.smem_bytes()} bytes of shared "
                             f"memory, more than {SMEM_LIMIT_BYTES}")

    def smem_bytes(self) -> int:
        """Two f32 logits tiles plus the two output rows."""
        return 2 * _ROWS * self.block_v * 4 + 2 * _ROWS * 4


def _check(logits: jax.Array, config: TuningConfig, tokens: jax.Array | None = None) -> None:
    b, t, v = logits.shape
    if logits.dtype != jnp.float32:
        raise NotImplementedError(f"logits must be float32, got {logits.dtype}")
    if t > _ROWS:
        raise NotImplementedError(f"block of T={t} positions: at most {_ROWS} are supported")
    if v % config.block_v:
        raise ValueError(f"vocabulary V={v} must be a multiple of {config.block_v=}")
    if tokens is not None and tokens.shape != (b, t):
        raise ValueError(f"{tokens.shape=} must be ({b}, {t})")


def _row_stats(logits_ref, tile_smem, bars, batch, rows: int, vocab: int, block_v: int):
    """Per position (max logit, sum of exp(logit - max), argmax) over the whole vocabulary."""
    tiles = vocab // block_v
    layout = plgpu.Layout.WGMMA

    def fetch(i, slot):
        # Only the block's `rows` positions are copied (no padded copy of the logits).
        plgpu.copy_gmem_to_smem(logits_ref.at[batch, :, pl.ds(i * block_v, block_v)],
                                tile_smem.at[slot, pl.ds(0, rows)], bars.at[slot])

    fetch(0, 0)

    def step(i, carry):
        row_max, row_sum, arg = carry
        slot = lax.rem(i, 2)

        @pl.when(i + 1 < tiles)
        def _():
            fetch(i + 1, 1 - slot)

        plgpu.barrier_wait(bars.at[slot])
        x = tile_smem[slot]
        tile_max = x.max(axis=1)
        cols = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=layout) + i * block_v
        is_max = x == lax.broadcast_in_dim(tile_max, x.shape, [0])
        tile_arg = jnp.where(is_max, cols, jnp.int32(_BIG)).min(axis=1)
        new_max = jnp.maximum(row_max, tile_max)
        shifted = jnp.exp(x - lax.broadcast_in_dim(new_max, x.shape, [0]))
        row_sum = row_sum * jnp.exp(row_max - new_max) + shifted.sum(axis=1)
        arg = jnp.where(tile_max > row_max, tile_arg, arg)  # strict: the first maximum wins
        return new_max, row_sum, arg

    vec = layout.reduce(1)
    init = (plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), vec),
            plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), vec),
            plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.int32), vec))
    return lax.fori_loop(0, tiles, step, init)


def _params(interpret: plgpu.InterpretGPUParams | None) -> dict:
    return dict(compiler_params=plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Warpgroup), interpret=interpret)


def vocab_stats(logits: jax.Array, config: TuningConfig | None = None,
                interpret: plgpu.InterpretGPUParams | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """Argmax and its softmax probability per position, in one pass over the vocabulary.

    Args:
      logits: float32 [B, T, V] (T <= 64).
      config: tile width (default TuningConfig()).
      interpret: Mosaic-GPU interpreter parameters (CPU tests), None on the GPU.
    Returns:
      (argmax int32 [B, T] (the first maximum), confidence float32 [B, T] = softmax at it).
    """
    config = config or TuningConfig()
    t = logits.shape[1]
    _check(logits, config)
    arg, row_sum = _stats_call(logits, config=config, interpret=interpret)
    # softmax at the argmax: exp(max - max) / sum_j exp(x_j - max)
    return arg[:, :t], 1.0 / row_sum[:, :t]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _stats_call(logits, *, config, interpret):
    b, t, v = logits.shape
    i32, f32 = jnp.int32, jnp.float32

    def vocab_stats_kernel(logits_ref, arg_out, sum_out):
        def scoped(tile_smem, arg_smem, sum_smem, bars):
            batch = lax.axis_index("b")
            # Rows >= T of the tiles are never written: their statistics are garbage and are
            # sliced off by the wrapper (each row's statistics depend on that row alone).
            _, row_sum, arg = _row_stats(logits_ref, tile_smem, bars, batch, t, v,
                                         config.block_v)
            arg_smem[...] = arg
            sum_smem[...] = row_sum
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(arg_smem, arg_out.at[batch])
            plgpu.copy_smem_to_gmem(sum_smem, sum_out.at[batch])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((2, _ROWS, config.block_v), f32),
                      plgpu.SMEM((_ROWS,), i32), plgpu.SMEM((_ROWS,), f32),
                      plgpu.Barrier(num_barriers=2))

    out_type = (jax.ShapeDtypeStruct((b, _ROWS), i32), jax.ShapeDtypeStruct((b, _ROWS), f32))
    return plgpu.kernel(vocab_stats_kernel, out_type=out_type, grid=(b,), grid_names=("b",),
                        **_params(interpret))(logits)


def confidence_commit(logits: jax.Array, tokens: jax.Array, masked: jax.Array,
                      threshold: jax.Array | float, config: TuningConfig | None = None,
                      interpret: plgpu.InterpretGPUParams | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A greedy denoise step's commit on the kernel's vocabulary statistics.

    Args:
      logits: float32 [B, T, V] of the bidirectional pass (T <= 64).
      tokens: int32 [B, T] the block.
      masked: bool [B, T] still-masked positions.
      threshold: float: commit masked positions with argmax probability >= threshold, and
        always the most confident masked position (lowest index on ties).
      config: tile width (default TuningConfig()).
      interpret: Mosaic-GPU interpreter parameters (CPU tests), None on the GPU.
    Returns:
      (tokens [B, T], masked [B, T], confidence float32 [B, T]).
    """
    config = config or TuningConfig()
    _check(logits, config, tokens)
    candidate, confidence = vocab_stats(logits, config, interpret)
    # The rule over T positions is a few XLA ops: the kernel would need a cross-warp reduction.
    masked_conf = jnp.where(masked, confidence, -jnp.inf)
    top1 = jnp.arange(tokens.shape[1])[None, :] == jnp.argmax(masked_conf, axis=1)[:, None]
    commit = masked & ((confidence >= threshold) | top1)
    return jnp.where(commit, candidate, tokens), masked & ~commit, confidence


def verify_accept(logits: jax.Array, drafts: jax.Array, config: TuningConfig | None = None,
                  interpret: plgpu.InterpretGPUParams | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy verification on the kernel's argmax over the vocabulary.

    Args:
      logits: float32 [B, T, V] of the causal verify pass (T <= 64).
      drafts: int32 [B, T] the verified block [seed, d_1, ..., d_{T-1}].
      config: tile width (default TuningConfig()).
      interpret: Mosaic-GPU interpreter parameters (CPU tests), None on the GPU.
    Returns:
      (predicted int32 [B, T], accepted int32 [B], bonus int32 [B]).
    """
    config = config or TuningConfig()
    _check(logits, config, drafts)
    predicted, _ = vocab_stats(logits, config, interpret)
    # The leading run of predicted[i] == drafts[i + 1], and the prediction after it.
    match = predicted[:, :-1] == drafts[:, 1:]
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    bonus = jnp.take_along_axis(predicted, accepted[:, None], axis=1)[:, 0]
    return predicted, accepted, bonus
