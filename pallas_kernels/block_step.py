"""Fused per-step work of block refinement and verification (Mosaic GPU, Hopper).

Both kernels stream the block's logits [T, V] through shared memory once, keeping per position
an online max, sum of exponentials and argmax, so the softmax is never materialised:

- `confidence_commit` (a greedy denoise step): confidence = softmax(logits)[argmax] = 1 / sum,
  then the threshold + always-commit-top-1 rule of spec/decoding.md section 2, applied to the
  block's tokens and mask in the same kernel.
- `verify_accept` (a greedy verify pass): argmax per position, the leading run of agreements
  with the next draft, and the bonus token.

One thread block per batch row. T is padded to 64 rows (one WGMMA-layout tile); the vocabulary
is read in `block_v`-wide tiles, double-buffered.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

__all__ = ["TuningConfig", "confidence_commit", "verify_accept"]

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
        """Two f32 logits tiles plus the row vectors."""
        return 2 * _ROWS * self.block_v * 4 + 8 * _ROWS * 4


def _check(logits: jax.Array, tokens: jax.Array, config: TuningConfig) -> None:
    b, t, v = logits.shape
    if logits.dtype != jnp.float32:
        raise NotImplementedError(f"logits must be float32, got {logits.dtype}")
    if t > _ROWS:
        raise NotImplementedError(f"block of T={t} positions: at most {_ROWS} are supported")
    if v % config.block_v:
        raise ValueError(f"vocabulary V={v} must be a multiple of {config.block_v=}")
    if tokens.shape != (b, t):
        raise ValueError(f"{tokens.shape=} must be ({b}, {t})")


def _row_stats(logits_ref, tile_smem, bars, batch, vocab: int, block_v: int):
    """Per position (max logit, sum of exp(logit - max), argmax) over the whole vocabulary."""
    tiles = vocab // block_v
    layout = plgpu.Layout.WGMMA

    def fetch(i, slot):
        plgpu.copy_gmem_to_smem(logits_ref.at[batch, :, pl.ds(i * block_v, block_v)],
                                tile_smem.at[slot], bars.at[slot])

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


def _store_rows(batch, *pairs) -> None:
    """Copies each (SMEM row, GMEM output) pair to the output's row `batch`, then waits."""
    plgpu.commit_smem()
    for smem, out in pairs:
        plgpu.copy_smem_to_gmem(smem, out.at[batch])
    plgpu.wait_smem_to_gmem(0)


def _pad_rows(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, _ROWS - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _params(interpret: plgpu.InterpretGPUParams | None) -> dict:
    return dict(compiler_params=plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Warpgroup), interpret=interpret)


def confidence_commit(logits: jax.Array, tokens: jax.Array, masked: jax.Array,
                      threshold: jax.Array | float, config: TuningConfig | None = None,
                      interpret: plgpu.InterpretGPUParams | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A greedy denoise step's commit, fused with the softmax statistics.

    Args:
      logits: float32 [B, T, V] of the bidirectional pass (T <= 64).
      tokens: int32 [B, T] the block.
      masked: bool [B, T] still-masked positions.
      threshold: float: commit masked positions with argmax probability >= threshold, and
        always the most confident masked position.
      config: tile width (default TuningConfig()).
      interpret: Mosaic-GPU interpreter parameters (CPU tests), None on the GPU.
    Returns:
      (tokens [B, T], masked [B, T], confidence float32 [B, T]).
    """
    config = config or TuningConfig()
    _check(logits, tokens, config)
    b, t, _ = logits.shape
    meta = jnp.zeros((32,), jnp.float32).at[0].set(threshold)
    out_tokens, out_masked, confidence = _commit_call(
        _pad_rows(logits), _pad_rows(tokens.astype(jnp.int32)),
        _pad_rows(masked.astype(jnp.int32)), meta, config=config, interpret=interpret)
    return out_tokens[:, :t], out_masked[:, :t] != 0, confidence[:, :t]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _commit_call(logits, tokens, masked, meta, *, config, interpret):
    b, _, v = logits.shape
    i32, f32 = jnp.int32, jnp.float32

    def body(logits_ref, tokens_ref, masked_ref, meta_ref, tokens_out, masked_out, conf_out):
        def scoped(tile_smem, tok_smem, mask_smem, meta_smem, conf_smem, bars, in_bars):
            batch = lax.axis_index("b")
            plgpu.copy_gmem_to_smem(tokens_ref.at[batch], tok_smem, in_bars.at[0])
            plgpu.copy_gmem_to_smem(masked_ref.at[batch], mask_smem, in_bars.at[1])
            plgpu.copy_gmem_to_smem(meta_ref, meta_smem, in_bars.at[2])
            row_max, row_sum, arg = _row_stats(logits_ref, tile_smem, bars, batch, v,
                                               config.block_v)
            del row_max
            confidence = 1.0 / row_sum  # softmax at the argmax: exp(max - max) / sum
            for i in range(3):
                plgpu.barrier_wait(in_bars.at[i])
            is_masked = mask_smem[...] != 0
            threshold = meta_smem[0]
            masked_conf = jnp.where(is_masked, confidence, -jnp.inf)
            best = masked_conf.max(axis=0)
            positions = plgpu.broadcasted_iota(i32, (_ROWS,), 0,
                                               layout=plgpu.Layout.WGMMA.reduce(1))
            top1 = jnp.where(masked_conf == best, positions, jnp.int32(_BIG)).min(axis=0)
            commit = is_masked & ((confidence >= threshold) | (positions == top1))
            tok_smem[...] = jnp.where(commit, arg, tok_smem[...])
            mask_smem[...] = jnp.where(commit, 0, mask_smem[...])
            conf_smem[...] = confidence
            _store_rows(batch, (tok_smem, tokens_out), (mask_smem, masked_out),
                        (conf_smem, conf_out))

        pl.run_scoped(scoped, plgpu.SMEM((2, _ROWS, config.block_v), f32),
                      plgpu.SMEM((_ROWS,), i32), plgpu.SMEM((_ROWS,), i32),
                      plgpu.SMEM(meta.shape, f32), plgpu.SMEM((_ROWS,), f32),
                      plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=3))

    out_type = (jax.ShapeDtypeStruct((b, _ROWS), i32), jax.ShapeDtypeStruct((b, _ROWS), i32),
                jax.ShapeDtypeStruct((b, _ROWS), f32))
    return plgpu.kernel(body, out_type=out_type, grid=(b,), grid_names=("b",),
                        **_params(interpret))(logits, tokens, masked, meta)


def verify_accept(logits: jax.Array, drafts: jax.Array, config: TuningConfig | None = None,
                  interpret: plgpu.InterpretGPUParams | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy verification fused with the argmax over the vocabulary.

    Args:
      logits: float32 [B, T, V] of the causal verify pass (T <= 64).
      drafts: int32 [B, T] the verified block [seed, d_1, ..., d_{T-1}].
      config: tile width (default TuningConfig()).
      interpret: Mosaic-GPU interpreter parameters (CPU tests), None on the GPU.
    Returns:
      (predicted int32 [B, T], accepted int32 [B], bonus int32 [B]).
    """
    config = config or TuningConfig()
    _check(logits, drafts, config)
    b, t, _ = logits.shape
    # next_draft[i] = d_{i+1}; positions without a next draft (i >= T-1) can never match.
    next_draft = jnp.full((b, _ROWS), -1, jnp.int32).at[:, :t - 1].set(drafts[:, 1:])
    predicted, accepted, bonus = _verify_call(_pad_rows(logits), next_draft, config=config,
                                              interpret=interpret)
    return predicted[:, :t], accepted[:, 0], bonus[:, 0]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _verify_call(logits, next_draft, *, config, interpret):
    b, _, v = logits.shape
    i32, f32 = jnp.int32, jnp.float32

    def body(logits_ref, next_ref, predicted_out, accepted_out, bonus_out):
        def scoped(tile_smem, next_smem, pred_smem, acc_smem, bonus_smem, bars, in_bar):
            batch = lax.axis_index("b")
            plgpu.copy_gmem_to_smem(next_ref.at[batch], next_smem, in_bar.at[0])
            _, _, arg = _row_stats(logits_ref, tile_smem, bars, batch, v, config.block_v)
            plgpu.barrier_wait(in_bar.at[0])
            positions = plgpu.broadcasted_iota(i32, (_ROWS,), 0,
                                               layout=plgpu.Layout.WGMMA.reduce(1))
            # The leading run ends at the first position whose argmax differs from the next
            # draft (positions past the block never match, so the run stops at T-1).
            accepted = jnp.where(arg != next_smem[...], positions, jnp.int32(_BIG)).min(axis=0)
            bonus = jnp.where(positions == accepted, arg, jnp.int32(0)).max(axis=0)
            pred_smem[...] = arg
            # Scalars stored as full rows in the positions' layout (a 64-element splat cannot
            # be stored).
            acc_smem[...] = jnp.where(positions >= 0, accepted, arg)
            bonus_smem[...] = jnp.where(positions >= 0, bonus, arg)
            _store_rows(batch, (pred_smem, predicted_out), (acc_smem, accepted_out),
                        (bonus_smem, bonus_out))

        pl.run_scoped(scoped, plgpu.SMEM((2, _ROWS, config.block_v), f32),
                      plgpu.SMEM((_ROWS,), i32), plgpu.SMEM((_ROWS,), i32),
                      plgpu.SMEM((_ROWS,), i32), plgpu.SMEM((_ROWS,), i32),
                      plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=1))

    out_type = tuple(jax.ShapeDtypeStruct((b, _ROWS), i32) for _ in range(3))
    return plgpu.kernel(body, out_type=out_type, grid=(b,), grid_names=("b",),
                        **_params(interpret))(logits, next_draft)
