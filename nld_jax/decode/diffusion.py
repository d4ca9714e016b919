"""Diffusion mode (block diffusion, NVIDIA's "FastDiffuser"): blocks refined in parallel.

Each block starts as [seed, MASK * (B-1)] after the committed prefix. Denoise steps are
bidirectional forwards against the cache (never written) that commit masked positions by
confidence; a causal commit forward then writes the finished block and yields the next seed.
Blocks are the outer lax.while_loop, denoise steps the inner one: one XLA program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.cache import KVCache
from nld_jax.decode.common import Budget, Sampler, Stream, emit, run_loop
from nld_jax.model import NLDModel
from nld_jax.sampling import is_eos
from nld_jax.step_kernels import greedy_commit

__all__ = ["Settings", "State", "init", "step", "done", "run"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Settings:
    """How blocks are refined."""

    threshold: jax.Array  # float32 []: commit masked positions with confidence >= threshold
    denoise_steps: jax.Array  # int32 []: at most this many denoise forwards a block
    mask_token_id: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    use_threshold: bool = dataclasses.field(metadata=dict(static=True))  # False: even schedule
    all_mask_init: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Greedy threshold steps on pallas_kernels.block_step (nld_jax.step_kernels decides).
    step_kernels: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The block loop's carry."""

    cache: KVCache  # committed blocks; `seed` is not in it yet
    tokens: jax.Array  # int32 [B, O]: emitted tokens
    num_tokens: jax.Array  # int32 [B]
    seed: jax.Array  # int32 [B]: first token of the next block
    finished: jax.Array  # bool [B]
    num_blocks: jax.Array  # int32 [B]: blocks emitted per row
    denoise_steps: jax.Array  # int32 [B]: denoise forwards that changed each row
    rng: jax.Array
    num_forwards: jax.Array  # int32 []: forwards after the prefill (whole batch)
    row_forwards: jax.Array  # int32 [B]: forwards each row took part in while unfinished


def init(cache: KVCache, seed: jax.Array, out_len: int, budget: Budget, rng: jax.Array) -> State:
    """The state after the prefill sampled `seed` [B] (emitted as the first block's first token)."""
    b = seed.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return State(cache=cache, tokens=jnp.zeros((b, out_len), jnp.int32), num_tokens=zeros,
                 seed=seed, finished=jnp.zeros((b,), bool), num_blocks=zeros,
                 denoise_steps=zeros, rng=rng, num_forwards=jnp.zeros((), jnp.int32),
                 row_forwards=zeros)


def _eos_settled(x: jax.Array, masked: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """bool [B]: some committed EOS has no mask to its left (the rest cannot be emitted)."""
    t = x.shape[1]
    positions = jnp.arange(t)[None, :]
    first_mask = jnp.min(jnp.where(masked, positions, t), axis=1, keepdims=True)
    return jnp.any(is_eos(x, eos_ids) & ~masked & (positions < first_mask), axis=1)


def _denoise(model: NLDModel, sampler: Sampler, settings: Settings, eos_ids: jax.Array,
             cache: KVCache, x: jax.Array, masked: jax.Array, rng: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Refines one block until no row needs another step. Returns x, steps [B], forwards, rng."""
    initial_masks = jnp.sum(masked, axis=1)  # [B]
    # The even schedule: k_i = m0 // S + (i < m0 % S), front-loading the remainder.
    base, extra = initial_masks // settings.denoise_steps, initial_masks % settings.denoise_steps

    def needs_step(x: jax.Array, masked: jax.Array, i: jax.Array) -> jax.Array:
        return jnp.any(masked, axis=1) & ~_eos_settled(x, masked, eos_ids) & (
            i < settings.denoise_steps)

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

    def body(carry):
        x, masked, i, steps, forwards, rng = carry
        active = needs_step(x, masked, i)
        logits, _ = model.forward_block(x, cache, causal=False, write=False)
        rng, key = jax.random.split(rng)
        if settings.step_kernels and settings.use_threshold:
            x, masked = jax.lax.cond(
                sampler.temperature > 0, commit_xla,
                lambda x, masked, i, active, logits, key: greedy_commit(
                    logits, x, masked, settings.threshold, active),
                x, masked, i, active, logits, key)
        else:
            x, masked = commit_xla(x, masked, i, active, logits, key)
        return x, masked, i + 1, steps + active.astype(jnp.int32), forwards + 1, rng

    def cond(carry):
        x, masked, i = carry[:3]
        return jnp.any(needs_step(x, masked, i))

    zeros = jnp.zeros((x.shape[0],), jnp.int32)
    x, masked, _, steps, forwards, rng = jax.lax.while_loop(
        cond, body, (x, masked, jnp.int32(0), zeros, jnp.int32(0), rng))
    return x, masked, steps, forwards, rng


def step(model: NLDModel, sampler: Sampler, budget: Budget, settings: Settings,
         state: State) -> State:
    """One block: init, denoise, commit forward, emit."""
    b, size = state.seed.shape[0], settings.block_size
    active = ~state.finished
    mask = jnp.full((b, size), settings.mask_token_id, jnp.int32)
    masked = jnp.broadcast_to(jnp.arange(size)[None, :] >= (0 if settings.all_mask_init else 1),
                              (b, size))
    masked = masked & active[:, None]  # finished rows have nothing to refine
    x = mask if settings.all_mask_init else mask.at[:, 0].set(state.seed)
    x, still_masked, steps, forwards, rng = _denoise(model, sampler, settings, budget.eos_ids,
                                                     state.cache, x, masked, state.rng)
    # Commit: a causal forward writes the block; its last position gives the next seed.
    logits, cache = model.forward_block(x, state.cache, causal=True, write=True,
                                        logits_index=jnp.full((b,), size - 1, jnp.int32))
    cache = cache.advance(jnp.where(active, size, 0))
    rng, key = jax.random.split(rng)
    seed = sampler(logits[:, 0], key)
    tokens, num_tokens = emit(state.tokens, state.num_tokens, x, jnp.where(active, size, 0))
    num_blocks = state.num_blocks + active.astype(jnp.int32)
    blocks_allowed = (budget.max_new_tokens + size - 1) // size
    block_has_eos = jnp.any(is_eos(x, budget.eos_ids) & ~still_masked, axis=1)
    finished = state.finished | block_has_eos | (num_blocks >= blocks_allowed)
    state = State(cache=cache, tokens=tokens, num_tokens=num_tokens,
                  seed=jnp.where(active, seed, state.seed), finished=finished,
                  num_blocks=num_blocks, denoise_steps=state.denoise_steps + steps, rng=rng,
                  num_forwards=state.num_forwards + forwards + 1,
                  row_forwards=state.row_forwards + jnp.where(active, steps + 1, 0))
    return _stop_on_eos_seed(state, budget, settings)


def _stop_on_eos_seed(state: State, budget: Budget, settings: Settings) -> State:
    """A row whose next seed is EOS emits it alone and ends, without running another block."""
    if settings.all_mask_init:  # the seed is not emitted in that variant
        return state
    stop = ~state.finished & is_eos(state.seed, budget.eos_ids)
    tokens, num_tokens = emit(state.tokens, state.num_tokens, state.seed[:, None],
                              stop.astype(jnp.int32))
    return dataclasses.replace(state, tokens=tokens, num_tokens=num_tokens,
                               finished=state.finished | stop)


def done(state: State) -> jax.Array:
    """Every row has finished."""
    return jnp.all(state.finished)


def run(model: NLDModel, sampler: Sampler, budget: Budget, settings: Settings,
        state: State, stream: Stream | None = None) -> State:
    """Blocks until every row has finished; with `stream`, sends every block to the host."""
    state = _stop_on_eos_seed(state, budget, settings)
    return run_loop(lambda s: step(model, sampler, budget, settings, s), done, state, stream)
