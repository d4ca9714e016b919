"""Diffusion mode (block diffusion, NVIDIA's "FastDiffuser"): blocks refined in parallel.

Each block of T tokens starts as [pending, MASK * (T-1)] after the committed prefix. Denoise
steps are bidirectional forwards against the cache (never written) that commit masked positions
by confidence; a causal commit forward then writes the finished block and yields the next pending
token. Blocks are the outer lax.while_loop, denoise steps the inner one: one XLA program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import checks
from nld_jax.cache import KVCache
from nld_jax.config import NLDConfig
from nld_jax.decode.common import (
    BlockSettings,
    Context,
    Core,
    Mode,
    Options,
    block_size_option,
    emit,
    emit_pending,
    extend,
    row_field,
)
from nld_jax.kernels import greedy_commit
from nld_jax.sampling import is_eos

__all__ = ["MODE", "Settings", "State", "init", "step", "stats"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Settings(BlockSettings):
    """How blocks are refined."""

    whole_blocks = True  # whole blocks are emitted: the budget rounds up

    threshold: jax.Array  # float32 []: commit masked positions with confidence >= threshold
    denoise_steps: jax.Array  # int32 []: at most this many denoise forwards a block
    use_threshold: bool = dataclasses.field(metadata=dict(static=True))  # False: even schedule
    # Start blocks all-mask (SGLang/vLLM) instead of [pending, MASK...].
    all_mask_init: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def from_options(cls, config: NLDConfig, options: Options) -> Settings:
        block = block_size_option(config, options, cls)
        threshold = options.threshold
        if threshold is not None:  # None: the even schedule
            threshold = checks.real("threshold", threshold, low=0.0, high=1.0, low_open=True)
        steps = block if options.denoise_steps is None else options.denoise_steps
        steps = checks.integer("denoise_steps", steps, low=1, high=block)
        if not isinstance(options.all_mask_init, bool | np.bool_):
            raise TypeError(f"all_mask_init={options.all_mask_init!r} must be True or False")
        return cls(threshold=jnp.float32(1.0 if threshold is None else threshold),
                   denoise_steps=jnp.int32(steps), mask_token_id=config.mask_token_id,
                   block_size=block, use_threshold=threshold is not None,
                   all_mask_init=bool(options.all_mask_init))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State(Core):
    """The block loop's carry: the core plus per-row block figures."""

    num_blocks: jax.Array = row_field()  # int32 [B]: blocks emitted per row
    denoise_steps: jax.Array = row_field()  # int32 [B]: denoise forwards that changed each row


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Denoising:
    """The denoise loop's carry."""

    x: jax.Array  # int32 [B, T]: the block
    masked: jax.Array  # bool [B, T]: positions still to commit
    i: jax.Array  # int32 []: denoise steps taken
    steps: jax.Array  # int32 [B]: steps that changed each row
    forwards: jax.Array  # int32 []
    rng: jax.Array


def init(ctx: Context, core: Core) -> State:
    """The prefill's token is the first block's first token (emitted with the block), unless it
    is an EOS: then it is emitted alone and the row ends."""
    zeros = jnp.zeros_like(core.num_tokens)
    return _stop_on_eos_pending(ctx, extend(State, core, num_blocks=zeros, denoise_steps=zeros))


def _eos_settled(x: jax.Array, masked: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """bool [B]: some committed EOS has no mask to its left (the rest cannot be emitted)."""
    t = x.shape[1]
    positions = jnp.arange(t)[None, :]
    first_mask = jnp.min(jnp.where(masked, positions, t), axis=1, keepdims=True)
    return jnp.any(is_eos(x, eos_ids) & ~masked & (positions < first_mask), axis=1)


def _denoise(ctx: Context, cache: KVCache, x: jax.Array, masked: jax.Array, rng: jax.Array
             ) -> _Denoising:
    """Refines one block until no row needs another step."""
    settings, sampler, eos_ids = ctx.settings, ctx.sampler, ctx.eos_ids
    initial_masks = jnp.sum(masked, axis=1)  # [B]
    # The even schedule: k_i = m0 // S + (i < m0 % S), front-loading the remainder.
    base, extra = initial_masks // settings.denoise_steps, initial_masks % settings.denoise_steps

    def needs_step(s: _Denoising) -> jax.Array:
        return jnp.any(s.masked, axis=1) & ~_eos_settled(s.x, s.masked, eos_ids) & (
            s.i < settings.denoise_steps)

    def commit_xla(x, masked, i, active, logits, key):
        # Gumbel-max at temperature > 0; the noise is only drawn when it is used.
        candidate = jax.lax.cond(
            sampler.temperature > 0,
            lambda: jnp.argmax(logits + sampler.temperature * jax.random.gumbel(
                key, logits.shape, jnp.float32), axis=-1).astype(jnp.int32),
            lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))  # [B, T]
        # Confidence from the untempered softmax over the full vocabulary.
        probs = jax.nn.softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(probs, candidate[..., None], axis=-1)[..., 0]
        confidence = jnp.where(masked, confidence, -jnp.inf)
        if settings.use_threshold:
            top1 = jnp.arange(x.shape[1])[None, :] == jnp.argmax(confidence, axis=1)[:, None]
            commit = masked & ((confidence >= settings.threshold) | top1)
        else:
            k = base + (i < extra).astype(jnp.int32)  # [B]
            order = jnp.argsort(-confidence, axis=1, stable=True)  # ties: lower position first
            rank = jnp.argsort(order, axis=1)
            commit = masked & (rank < k[:, None])
        commit &= active[:, None]
        return jnp.where(commit, candidate, x), masked & ~commit

    def body(s: _Denoising) -> _Denoising:
        active = needs_step(s)
        hidden, _ = ctx.forward(s.x, cache, causal=False)
        logits = ctx.logits(hidden)
        rng, key = jax.random.split(s.rng)
        if ctx.kernels.step and settings.use_threshold:
            x, masked = jax.lax.cond(
                sampler.temperature > 0, commit_xla,
                lambda x, masked, i, active, logits, key: greedy_commit(
                    logits, x, masked, settings.threshold, active),
                s.x, s.masked, s.i, active, logits, key)
        else:
            x, masked = commit_xla(s.x, s.masked, s.i, active, logits, key)
        return _Denoising(x=x, masked=masked, i=s.i + 1, steps=s.steps + active.astype(jnp.int32),
                          forwards=s.forwards + 1, rng=rng)

    first = _Denoising(x=x, masked=masked, i=jnp.int32(0),
                       steps=jnp.zeros((x.shape[0],), jnp.int32), forwards=jnp.int32(0), rng=rng)
    return jax.lax.while_loop(lambda s: jnp.any(needs_step(s)), body, first)


def step(ctx: Context, state: State) -> State:
    """One block: init, denoise, commit forward, emit."""
    settings = ctx.settings
    b, size = state.pending.shape[0], settings.block_size
    active = ~state.finished
    mask = jnp.full((b, size), settings.mask_token_id, jnp.int32)
    masked = jnp.broadcast_to(jnp.arange(size)[None, :] >= (0 if settings.all_mask_init else 1),
                              (b, size))
    masked = masked & active[:, None]  # finished rows have nothing to refine
    x = mask if settings.all_mask_init else mask.at[:, 0].set(state.pending)
    done = _denoise(ctx, state.cache, x, masked, state.rng)
    x = done.x
    # Commit: a causal forward writes the block; its last position gives the next pending token.
    hidden, block_kv = ctx.forward(x, state.cache, causal=True)
    cache = state.cache.write(block_kv, state.cache.lengths).advance(jnp.where(active, size, 0))
    rng, key = jax.random.split(done.rng)
    pending = ctx.sampler(ctx.logits(hidden[:, -1:])[:, 0], key)
    tokens, num_tokens = emit(state.tokens, state.num_tokens, x, jnp.where(active, size, 0))
    num_blocks = state.num_blocks + active.astype(jnp.int32)
    blocks_allowed = (state.max_new_tokens + size - 1) // size
    block_has_eos = jnp.any(is_eos(x, ctx.eos_ids) & ~done.masked, axis=1)
    finished = state.finished | block_has_eos | (num_blocks >= blocks_allowed)
    state = dataclasses.replace(
        state, cache=cache, tokens=tokens, num_tokens=num_tokens,
        pending=jnp.where(active, pending, state.pending), finished=finished,
        num_blocks=num_blocks, denoise_steps=state.denoise_steps + done.steps, rng=rng,
        num_forwards=state.num_forwards + done.forwards + 1,
        row_forwards=state.row_forwards + jnp.where(active, done.steps + 1, 0))
    return _stop_on_eos_pending(ctx, state)


def _stop_on_eos_pending(ctx: Context, state: State) -> State:
    """A row whose next pending token is EOS emits it alone and ends, without another block."""
    if ctx.settings.all_mask_init:  # the pending token is not emitted in that variant
        return state
    return emit_pending(ctx, state, ~state.finished & is_eos(state.pending, ctx.eos_ids))


def stats(final: State) -> dict[str, Any]:
    """Blocks emitted and denoise forwards per block."""
    blocks = int(final.num_blocks.sum())
    return {"num_blocks": blocks,
            "denoise_steps_per_block": int(final.denoise_steps.sum()) / max(blocks, 1)}


MODE = Mode(name="diffusion", settings=Settings, init=init, step=step, stats=stats)
