"""block_attention: a block of T queries against the KV cache plus the block's own K/V (Mosaic GPU).

One kernel serves every decoding forward: T = 1 (AR decode), T = block size (denoise, draft,
verify, commit) and larger T (prefill). Design, for Hopper (sm_90a):

- GQA folding: the G query heads of one KV head and the T tokens are the rows of one matrix
  (row r = t * G + g), so 4 heads x 32 tokens fill a 128-row tile and each K/V tile is read
  once per KV head instead of once per query head.
- One consumer warpgroup per 64 rows of the tile (two for a 128-row tile), each with its own
  64 x H float32 accumulator: a single warpgroup holding a 128-row accumulator needs more than
  the 255 registers a thread has and spills (ptxas, sm_90a). Warpgroup 0 issues the TMA copies;
  a K/V slot is refilled only after every warpgroup has arrived on its "consumed" barrier.
- The cache is the model's stacked [L, B, S, K, H] with the layer a traced index, so the
  layer-scanned model passes the whole cache and never slices it. Only the first
  cdiv(length, block_kv) tiles of a row are read (the tail of the last tile is masked). The
  block's own K/V come last, with the in-block pattern (causal or bidirectional) chosen at run
  time by a flag, so one compiled kernel serves both; or, with `quadratic=b`, the pattern of
  quadratic self-speculation's b*(b+1)-token block (spec/decoding.md section 4), computed per
  (query, key) from the two indices, so that mode needs no explicit mask.
- Per-call scalars (lengths, causal flag, layer) are read from global memory, not staged in
  dynamically indexed shared memory (ptxas could not bound that index and reported a potential
  out-of-bound access).
- Flash-decoding: the prefix tiles are split across `num_splits` thread blocks; each writes an
  unnormalised partial output with its running max and sum, and a small XLA combine merges them.
- bf16 inputs, f32 accumulation (wgmma), online softmax in f32. Every K/V tile is
  double-buffered: the copy of tile i+1 is issued before tile i is used.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

__all__ = ["TuningConfig", "block_attention", "default_config", "unsupported_reason",
           "kernel_cost", "SMEM_LIMIT_BYTES"]

SMEM_LIMIT_BYTES = 227 * 1024  # H100: 232,448 bytes of shared memory per thread block
_WG_ROWS = 64  # rows per consumer warpgroup (one wgmma M tile)
_META_ALIGN = 32  # the metadata array is padded to 128 bytes


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Tile sizes of the kernel; validated on construction."""

    block_q: int = 128  # rows (T*G folded) per thread block: 64 or 128 (one warpgroup per 64)
    block_kv: int = 64  # keys per tile
    num_splits: int = 1  # prefix splits across thread blocks (flash-decoding)

    def __post_init__(self) -> None:
        if self.block_q not in (64, 128):
            raise ValueError(f"{self.block_q=} must be 64 or 128 (one or two warpgroups)")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"{self.block_kv=} must be a multiple of 64 in [64, 256]")
        if self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be >= 1")

    @property
    def warpgroups(self) -> int:
        """Consumer warpgroups per thread block (64 rows each)."""
        return self.block_q // _WG_ROWS

    def smem_bytes(self, head_dim: int) -> int:
        """Shared memory the kernel allocates at this head_dim (bf16 tiles, f32 output)."""
        q = self.block_q * head_dim * 2
        kv = 2 * 2 * self.block_kv * head_dim * 2  # K and V, two slots each
        p = self.block_q * self.block_kv * 2
        out = self.block_q * head_dim * 4 + 2 * self.block_q * 4
        return q + kv + p + out


def default_config(rows: int, slots: int) -> TuningConfig:
    """Tiles for `rows` folded query rows (T*G) against a cache of `slots`.

    One 64-row tile when the rows fit (AR decode: G rows), else 128. A few row tiles against a
    long cache split the prefix across up to 16 thread blocks per (row tile, KV head) so a
    batch-1 decode still fills the SMs; many row tiles (a prefill) fill them already, and
    splitting would only multiply the float32 partial outputs.
    """
    block_q = 64 if rows <= 64 else 128
    row_tiles = -(-rows // block_q)
    splits = min(16, slots // 1024, 16 // row_tiles)
    return TuningConfig(block_q=block_q, block_kv=64, num_splits=max(1, splits))


def unsupported_reason(q: jax.Array | jax.ShapeDtypeStruct,
                       k_cache: jax.Array | jax.ShapeDtypeStruct | None) -> str | None:
    """Why the kernel cannot serve queries `q` [B, T, N, H] against `k_cache` [L, B, S, K, H].

    The single statement of the kernel's applicability: the model's kernel choice and the
    kernel's own checks both use it. None when the kernel applies.
    """
    if k_cache is None:
        return "there is no KV cache (a full-sequence forward)"
    if q.dtype != jnp.bfloat16 or k_cache.dtype != jnp.bfloat16:
        return f"the kernel takes bfloat16 q and cache, got {q.dtype} and {k_cache.dtype}"
    h = q.shape[-1]
    if h % 64:
        return f"head_dim={h} is not a multiple of 64 (the 128-byte swizzle)"
    if k_cache.ndim != 5:
        return f"the cache {k_cache.shape} is not stacked [L, B, S, K, H]"
    if k_cache.shape[2] % 64:
        return f"cache slots S={k_cache.shape[2]} are not a multiple of 64"
    return None


def _check(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
           k_block: jax.Array, v_block: jax.Array, config: TuningConfig) -> None:
    if (reason := unsupported_reason(q, k_cache)) is not None:
        raise NotImplementedError(f"block_attention cannot run: {reason}")
    b, t, n, h = q.shape
    if k_block.dtype != jnp.bfloat16 or v_block.dtype != jnp.bfloat16:
        raise NotImplementedError(f"block_attention takes bfloat16 k/v blocks, got "
                                  f"{k_block.dtype=}, {v_block.dtype=}")
    if k_cache.shape[1] != b or k_cache.shape[4] != h:
        raise ValueError(f"k_cache {k_cache.shape} must be [L, B={b}, S, K, H={h}]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{v_cache.shape=} must equal {k_cache.shape=}")
    kv = k_cache.shape[3]
    if n % kv:
        raise ValueError(f"query heads {n=} must be a multiple of KV heads {kv=}")
    if k_block.shape != (b, t, kv, h) or v_block.shape != k_block.shape:
        raise ValueError(f"k_block {k_block.shape} / v_block {v_block.shape} must be "
                         f"[B={b}, T={t}, K={kv}, H={h}]")
    if k_cache.shape[2] % config.block_kv:
        raise ValueError(f"cache slots S={k_cache.shape[2]} must be a multiple of "
                         f"{config.block_kv=}")
    if lengths.shape != (b,):
        raise ValueError(f"{lengths.shape=} must be ({b},)")
    if (need := config.smem_bytes(h)) > SMEM_LIMIT_BYTES:
        raise ValueError(f"{config} needs {need} bytes of shared memory at head_dim {h}, more "
                         f"than {SMEM_LIMIT_BYTES}")


def block_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                    k_block: jax.Array, v_block: jax.Array, causal: jax.Array | bool,
                    layer: jax.Array | int = 0, config: TuningConfig | None = None,
                    interpret: plgpu.InterpretGPUParams | None = None,
                    quadratic: int = 0) -> jax.Array:
    """Attention of a block against [cache[layer, :, :lengths] ++ block] on Hopper.

    Args:
      q: bf16 [B, T, N, H] queries (rotated; the softmax scale H**-0.5 is applied here).
      k_cache, v_cache: bf16 [L, B, S, K, H] the stacked cache; S a multiple of block_kv.
      lengths: int32 [B] valid cache length per row.
      k_block, v_block: bf16 [B, T, K, H] the block's own keys and values.
      causal: bool (may be traced): in-block causal if True, else bidirectional.
      layer: int32 scalar (may be traced): the cache layer to read.
      config: tile sizes (default `default_config`).
      interpret: Mosaic-GPU interpreter parameters to run on CPU (tests), None on the GPU.
      quadratic: b > 0: the block is quadratic self-speculation's T = b*(b+1) tokens, the chain
        d_0..d_{b-1} then b groups of b masks; `causal` is ignored. Chain token i sees chain
        tokens <= i; a mask of group i sees chain tokens <= i and its whole group.
    Returns:
      bf16 [B, T, N, H].
    """
    if quadratic and q.shape[1] != quadratic * (quadratic + 1):
        raise ValueError(f"{quadratic=} needs T = {quadratic * (quadratic + 1)} tokens, got "
                         f"T={q.shape[1]}")
    if (reason := unsupported_reason(q, k_cache)) is not None:
        raise NotImplementedError(f"block_attention cannot run: {reason}")
    config = config or default_config(q.shape[1] * (q.shape[2] // k_cache.shape[3]),
                                      k_cache.shape[2])
    _check(q, k_cache, v_cache, lengths, k_block, v_block, config)
    b, t, n, h = q.shape
    kv = k_cache.shape[3]
    g = n // kv
    rows = t * g
    m_pad = -(-rows // config.block_q) * config.block_q
    t_pad = -(-t // config.block_kv) * config.block_kv
    # Fold: row r = t * G + g of KV head k; the softmax scale goes into q once.
    q_rows = (q * jnp.asarray(h ** -0.5, q.dtype)).reshape(b, t, kv, g, h)
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(b, kv, rows, h)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, m_pad - rows), (0, 0)))
    pad_block = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    k_blk, v_blk = jnp.pad(k_block, pad_block), jnp.pad(v_block, pad_block)
    meta_len = -(-(b + 2) // _META_ALIGN) * _META_ALIGN
    meta = jnp.zeros((meta_len,), jnp.int32).at[:b].set(lengths.astype(jnp.int32))
    meta = meta.at[b].set(jnp.asarray(causal).astype(jnp.int32))
    meta = meta.at[b + 1].set(jnp.asarray(layer, jnp.int32))
    out, row_max, row_sum = _kernel_call(q_rows, k_cache, v_cache, k_blk, v_blk, meta,
                                         config=config, tokens=t, groups=g,
                                         interpret=interpret, quadratic=quadratic)
    # Combine the splits: each holds sum_j exp(s_j - m) v_j and sum_j exp(s_j - m).
    top = jnp.max(row_max, axis=2, keepdims=True)
    weight = jnp.where(jnp.isneginf(row_max), 0.0, jnp.exp(row_max - top))
    numerator = jnp.sum(out * weight[..., None], axis=2)
    denominator = jnp.sum(row_sum * weight, axis=2)
    merged = numerator / denominator[..., None]  # [B, K, M_pad, H]
    merged = merged[:, :, :rows].reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4)
    return merged.reshape(b, t, n, h).astype(q.dtype)


def _quadratic_visible(query: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """Whether block token `query` sees block token `key` in quadratic self-speculation's
    layout: tokens [0, size) are the chain, token size + i*size + j is mask j of group i."""
    def owner(token):  # the chain token a token hangs off: itself, or its group's
        # lax.div (truncating) on a non-negative value: `//` lowers a sign fix-up on booleans
        # that Mosaic's register layouts reject.
        return jnp.where(token < size, token, lax.div(jnp.maximum(token - size, 0), size))

    query_owner = owner(query)
    same_group = (query >= size) & (key >= size) & (query_owner == owner(key))
    return ((key < size) & (key <= query_owner)) | same_group


def kernel_cost(batch: int, tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                lengths: int, config: TuningConfig | None = None, slots: int = 0,
                causal: bool = True) -> tuple[int, int]:
    """(HBM bytes, flops) of one call: the tiles it reads, the partials it writes, its wgmmas.

    The model a cost estimate should use instead of XLA's (which counts a custom call as
    nothing). Each row tile reads the row's valid prefix tiles and the block's tiles it needs
    (all of them, or up to its last token if causal) once per KV head; `lengths` is the valid
    cache length of every row.
    """
    groups = num_heads // num_kv_heads
    rows = tokens * groups
    config = config or default_config(rows, slots or lengths)
    bq, bkv = config.block_q, config.block_kv
    row_tiles = -(-rows // bq)
    own_tiles = -(-tokens // bkv)
    keys = 0
    for tile in range(row_tiles):
        last_token = min(tokens - 1, ((tile + 1) * bq - 1) // groups)
        own = min(last_token // bkv + 1, own_tiles) if causal else own_tiles
        keys += -(-lengths // bkv) * bkv + own * bkv
    kv_bytes = 2 * keys * head_dim * 2  # K and V, bf16
    q_bytes = row_tiles * bq * head_dim * 2
    partials = config.num_splits * row_tiles * bq * (head_dim + 2) * 4
    flops = 2 * 2 * bq * head_dim * keys  # QK^T and PV per key
    return (batch * num_kv_heads * (kv_bytes + q_bytes + partials),
            batch * num_kv_heads * flops)


@functools.partial(jax.jit,
                   static_argnames=("config", "tokens", "groups", "interpret", "quadratic"))
def _kernel_call(q_rows: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_blk: jax.Array,
                 v_blk: jax.Array, meta: jax.Array, *, config: TuningConfig, tokens: int,
                 groups: int, interpret: plgpu.InterpretGPUParams | None, quadratic: int = 0
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, kv, m_pad, h = q_rows.shape
    t_pad = k_blk.shape[1]
    bq, bkv, splits, wgs = config.block_q, config.block_kv, config.num_splits, config.warpgroups
    block_tiles = t_pad // bkv
    f32, bf16 = jnp.float32, jnp.bfloat16
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def block_attention_kernel(q_ref, kc_ref, vc_ref, kb_ref, vb_ref, meta_ref, o_ref, m_ref,
                               l_ref):
        def scoped(q_smem, k_smem, v_smem, p_smem, o_smem, m_smem, l_smem, q_bars, k_bars,
                   v_bars, consumed):
            batch, head = lax.axis_index("b"), lax.axis_index("kv")
            q_tile, split = lax.axis_index("qt"), lax.axis_index("split")
            wg = lax.axis_index("wg")
            first_row = q_tile * bq + wg * _WG_ROWS  # this warpgroup's first row
            plgpu.copy_gmem_to_smem(q_ref.at[batch, head, pl.ds(first_row, _WG_ROWS)],
                                    q_smem.at[wg], q_bars.at[wg])
            length = meta_ref[batch]
            causal = meta_ref[b] != 0
            layer = meta_ref[b + 1]
            # This split's prefix tiles, then (last split only) the block's own tiles. The
            # step count is the thread block's, shared by its warpgroups.
            prefix_tiles = pl.cdiv(length, bkv)
            per_split = pl.cdiv(prefix_tiles, splits)
            first = jnp.minimum(split * per_split, prefix_tiles)
            last = jnp.minimum(first + per_split, prefix_tiles)
            row_t = (q_tile * bq + (bq - 1)) // groups  # the largest token index in the tile
            own_tiles = jnp.where(causal & (quadratic == 0),
                                  jnp.minimum(row_t // bkv + 1, block_tiles), block_tiles)
            own_tiles = jnp.where(split == splits - 1, own_tiles, 0)
            steps = (last - first) + own_tiles

            def tile_source(step):
                in_prefix = step < last - first
                return in_prefix, jnp.where(in_prefix, first + step, step - (last - first))

            def fetch(step, slot):
                in_prefix, tile = tile_source(step)
                keys = pl.ds(tile * bkv, bkv)

                @pl.when(in_prefix)
                def _():
                    plgpu.copy_gmem_to_smem(kc_ref.at[layer, batch, keys, head],
                                            k_smem.at[slot], k_bars.at[slot])
                    plgpu.copy_gmem_to_smem(vc_ref.at[layer, batch, keys, head],
                                            v_smem.at[slot], v_bars.at[slot])

                @pl.when(~in_prefix)
                def _():
                    plgpu.copy_gmem_to_smem(kb_ref.at[batch, keys, head], k_smem.at[slot],
                                            k_bars.at[slot])
                    plgpu.copy_gmem_to_smem(vb_ref.at[batch, keys, head], v_smem.at[slot],
                                            v_bars.at[slot])

            @pl.when((steps > 0) & (wg == 0))
            def _():
                fetch(0, 0)

            plgpu.barrier_wait(q_bars.at[wg])
            layout = plgpu.Layout.WGMMA
            row_ids = plgpu.broadcasted_iota(jnp.int32, (_WG_ROWS, bkv), 0, layout=layout)
            col_ids = plgpu.broadcasted_iota(jnp.int32, (_WG_ROWS, bkv), 1, layout=layout)
            query_t = (row_ids + first_row) // groups

            def step_fn(step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step, 2)

                # Refill the other slot once every warpgroup is done with its previous tile.
                # (One warpgroup finishes its tile before refilling: no barrier needed.)
                if wgs > 1:
                    @pl.when((step > 0) & (wg == 0))
                    def _():
                        plgpu.barrier_wait(consumed.at[1 - slot])

                @pl.when((step + 1 < steps) & (wg == 0))
                def _():
                    fetch(step + 1, 1 - slot)

                plgpu.barrier_wait(k_bars.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                scores = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, bkv), f32))
                in_prefix, tile = tile_source(step)
                key = col_ids + tile * bkv
                # Scalar bounds only (Mosaic's warpgroup lowering has no scalar-predicate select
                # over arrays): prefix keys < length; own keys < T and, if causal, <= the query.
                key_limit = jnp.where(in_prefix, length, tokens)
                if quadratic:
                    visible = (key < key_limit) & (
                        _quadratic_visible(query_t, key, quadratic)
                        | (col_ids < jnp.where(in_prefix, bkv, 0)))  # the prefix: all keys
                else:
                    unbounded = jnp.where(in_prefix | ~causal, jnp.int32(1 << 30),
                                          jnp.int32(0))
                    visible = (key < key_limit) & (key <= query_t + unbounded)
                scores = jnp.where(visible, scores, -jnp.inf)
                m_new = jnp.maximum(m_i, scores.max(axis=1))
                alpha = jnp.exp(m_i - m_new)
                probs = jnp.exp(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
                l_i = l_i * alpha + probs.sum(axis=1)
                p_smem.at[wg][...] = probs.astype(bf16)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_bars.at[slot])

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
                    return acc_ref[...]

                update = pl.run_scoped(pv, plgpu.ACC((_WG_ROWS, h), f32))
                if wgs > 1:
                    plgpu.barrier_arrive(consumed.at[slot])
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + update
                return acc, m_new, l_i

            acc = plgpu.layout_cast(jnp.zeros((_WG_ROWS, h), f32), layout)
            m_i = plgpu.layout_cast(jnp.full((_WG_ROWS,), -jnp.inf, f32), layout.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((_WG_ROWS,), f32), layout.reduce(1))
            acc, m_i, l_i = lax.fori_loop(0, steps, step_fn, (acc, m_i, l_i))
            if wgs > 1:  # the last tile's arrivals: every phase of the barrier is observed
                @pl.when((steps > 0) & (wg == 0))
                def _():
                    plgpu.barrier_wait(consumed.at[lax.rem(steps - 1, 2)])

            o_smem.at[wg][...] = acc
            m_smem.at[wg][...] = m_i
            l_smem.at[wg][...] = l_i
            plgpu.commit_smem()
            rows_out = pl.ds(first_row, _WG_ROWS)
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[batch, head, split, rows_out])
            plgpu.copy_smem_to_gmem(m_smem.at[wg], m_ref.at[batch, head, split, rows_out])
            plgpu.copy_smem_to_gmem(l_smem.at[wg], l_ref.at[batch, head, split, rows_out])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((wgs, _WG_ROWS, h), bf16, transforms=swizzled),
            plgpu.SMEM((2, bkv, h), bf16, transforms=swizzled),
            plgpu.SMEM((2, bkv, h), bf16, transforms=swizzled),
            plgpu.SMEM((wgs, _WG_ROWS, bkv), bf16, transforms=swizzled),
            plgpu.SMEM((wgs, _WG_ROWS, h), f32),
            plgpu.SMEM((wgs, _WG_ROWS), f32),
            plgpu.SMEM((wgs, _WG_ROWS), f32),
            plgpu.Barrier(num_barriers=wgs),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=2),
            collective_axes="wg",
        )

    out_types = (jax.ShapeDtypeStruct((b, kv, splits, m_pad, h), f32),
                 jax.ShapeDtypeStruct((b, kv, splits, m_pad), f32),
                 jax.ShapeDtypeStruct((b, kv, splits, m_pad), f32))
    kernel = plgpu.kernel(
        block_attention_kernel, out_type=out_types, grid=(b, kv, m_pad // bq, splits),
        grid_names=("b", "kv", "qt", "split"), num_threads=wgs, thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)
    return kernel(q_rows, k_cache, v_cache, k_blk, v_blk, meta)
