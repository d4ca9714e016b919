"""Self-speculation, linear (NVIDIA's "LinearSpec"): a diffusion draft verified by a causal pass.

Each cycle: a bidirectional draft of [pending, MASK * (T-1)] (cache read, not written; LoRA on),
then a causal verify of [pending, d_1..d_{T-1}] that writes the block (LoRA off). The leading run
of drafts the verifier agrees with is accepted plus one bonus token; the cache's valid length
grows by that many, which rolls back the rejected slots for free. Two forwards per cycle.

At temperature > 0 the default is exact speculative sampling (accept d with probability
min(1, p(d)/q(d)), resample a rejection from normalize(max(0, p - q))), whose output is
distributed exactly as AR sampling; `accept_rule="match"` keeps NVIDIA's rule (sample the AR
token independently, accept the draft only if equal).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.cache import KVCache
from nld_jax.config import NLDConfig
from nld_jax.decode.common import (
    BlockSettings,
    Context,
    Core,
    Mode,
    Options,
    Sampler,
    block_size_option,
    emit,
    emit_pending,
    extend,
)
from nld_jax.kernels import greedy_verify
from nld_jax.sampling import is_eos, leading_run

__all__ = ["MODE", "Settings", "State", "init", "step", "stats", "accept", "commit",
           "draft_block", "ACCEPT_RULES"]

ACCEPT_RULES = ("exact", "match")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Settings(BlockSettings):
    """Static settings of the cycle."""

    accept_rule: str = dataclasses.field(default="exact", metadata=dict(static=True))

    @classmethod
    def from_options(cls, config: NLDConfig, options: Options) -> Settings:
        block = block_size_option(config, options, cls)
        if options.accept_rule not in ACCEPT_RULES:
            raise ValueError(f"unknown accept_rule={options.accept_rule!r}; expected one of "
                             f"{ACCEPT_RULES}")
        return cls(mask_token_id=config.mask_token_id, block_size=block,
                   accept_rule=options.accept_rule)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State(Core):
    """The cycle loop's carry: the core plus the acceptance figures."""

    accepted_histogram: jax.Array  # int32 [T]: cycles (over rows) that accepted c drafts


def init(ctx: Context, core: Core) -> State:
    """The prefill's token is the first emitted (and the first of the first block)."""
    state = extend(State, core,
                   accepted_histogram=jnp.zeros((ctx.settings.block_size,), jnp.int32))
    return emit_pending(ctx, state, jnp.ones_like(state.finished))


def _gather(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [B, T, ...] at index [B] -> [B, ...]."""
    return jax.vmap(lambda v, i: v[i])(values, index)


def _accept_exact(sampler: Sampler, draft_logits: jax.Array, verify_logits: jax.Array,
                  drafts: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: (accepted count c [B], the token at position c [B])."""
    b, t = drafts.shape
    # One filter call for both (top-p's per-round sums are all-reduces on a vocab-sharded
    # mesh: one call pays them once). q at block position j+1 drafted d_{j+1}; p at position
    # j predicts position j+1.
    log_q, log_p = sampler.log_probs(jnp.stack([draft_logits, verify_logits]))
    next_drafts = drafts[:, 1:]
    q_x = jnp.take_along_axis(log_q[:, 1:], next_drafts[..., None], axis=-1)[..., 0]
    p_x = jnp.take_along_axis(log_p[:, :-1], next_drafts[..., None], axis=-1)[..., 0]
    u_key, r_key = jax.random.split(key)
    uniform = jax.random.uniform(u_key, (b, t - 1), minval=1e-12)
    accepted = leading_run(jnp.log(uniform) < p_x - q_x)
    p_c = jnp.exp(_gather(log_p, accepted))
    q_next = jnp.exp(_gather(log_q, jnp.minimum(accepted + 1, t - 1)))
    residual = jnp.maximum(p_c - q_next, 0.0)
    # A rejection only happens where p < q somewhere, so the residual has mass; all accepted
    # (c = T-1) draws the bonus from p itself.
    use_residual = (accepted < t - 1) & (jnp.sum(residual, axis=-1) > 0)
    dist = jnp.where(use_residual[:, None], residual, p_c)
    bonus = jax.random.categorical(r_key, jnp.log(dist), axis=-1).astype(jnp.int32)
    return accepted, bonus


def accept(ctx: Context, verify_logits: jax.Array, drafts: jax.Array,
           draft_logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The verifier's decision on a block: (accepted drafts c [B], the token at position c [B]).

    Args:
      verify_logits: float32 [B, T, V]: causal logits of `drafts`; position j predicts j+1.
      drafts: int32 [B, T]: [pending, d_1..d_{T-1}].
      draft_logits: float32 [B, T, V]: the logits position j's draft was drawn from (used by
        exact speculative sampling only).
    """
    sampler = ctx.sampler
    sampling = sampler.temperature > 0

    def accept_matching(predicted: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Accept while the verifier's token equals the next draft; bonus = its token there."""
        accepted = leading_run(predicted[:, :-1] == drafts[:, 1:])
        return accepted, _gather(predicted, accepted)

    def accept_greedy() -> tuple[jax.Array, jax.Array]:
        if ctx.kernels.step:
            return greedy_verify(verify_logits, drafts)
        return accept_matching(jnp.argmax(verify_logits, axis=-1).astype(jnp.int32))

    def accept_sampled() -> tuple[jax.Array, jax.Array]:
        if ctx.settings.accept_rule == "match":
            return accept_matching(sampler(verify_logits, key))
        return _accept_exact(sampler, draft_logits, verify_logits, drafts, key)

    return jax.lax.cond(sampling, accept_sampled, accept_greedy)


def commit[S: State](ctx: Context, state: S, cache: KVCache, drafts: jax.Array,
                    accepted: jax.Array, bonus: jax.Array, rng: jax.Array, forwards: int) -> S:
    """Emits the accepted drafts and the bonus, advances the cache past them (the rest of the
    written block stays invalid: the rollback) and counts `forwards` for the cycle."""
    size = drafts.shape[1]
    active = ~state.finished
    positions = jnp.arange(size)[None, :]
    next_drafts = jnp.concatenate([drafts[:, 1:], drafts[:, -1:]], axis=1)
    emitted = jnp.where(positions < accepted[:, None], next_drafts, bonus[:, None])
    room = state.max_new_tokens - state.num_tokens
    counts = jnp.where(active, jnp.minimum(accepted + 1, room), 0)
    tokens, num_tokens = emit(state.tokens, state.num_tokens, emitted, counts)
    eos_emitted = jnp.any(is_eos(emitted, ctx.eos_ids) & (positions < counts[:, None]), axis=1)
    finished = state.finished | eos_emitted | (num_tokens >= state.max_new_tokens)
    histogram = state.accepted_histogram + jnp.sum(
        jax.nn.one_hot(accepted, size, dtype=jnp.int32) * active[:, None], axis=0)
    return dataclasses.replace(
        state, cache=cache.advance(jnp.where(active, accepted + 1, 0)), tokens=tokens,
        num_tokens=num_tokens, pending=jnp.where(active, bonus, state.pending),
        finished=finished, accepted_histogram=histogram, rng=rng,
        num_forwards=state.num_forwards + forwards,
        row_forwards=state.row_forwards + forwards * active.astype(jnp.int32))


def draft_block(ctx: Context, cache: KVCache, pending: jax.Array) -> jax.Array:
    """The draft pass: logits [B, T, V] of [pending, MASK * (T-1)], bidirectional, against the
    cache without writing it, the adapter on. Position j's logits draft position j."""
    settings = ctx.settings
    block = jnp.full((pending.shape[0], settings.block_size), settings.mask_token_id,
                     jnp.int32).at[:, 0].set(pending)
    hidden, _ = ctx.forward(block, cache, causal=False, lora_on=True)
    return ctx.logits(hidden)


def step(ctx: Context, state: State) -> State:
    """One draft + verify cycle."""
    rng, draft_key, verify_key = jax.random.split(state.rng, 3)
    draft_logits = draft_block(ctx, state.cache, state.pending)
    drafts = ctx.sampler(draft_logits, draft_key).at[:, 0].set(state.pending)  # [B, T]
    hidden, block_kv = ctx.forward(drafts, state.cache, causal=True)
    cache = state.cache.write(block_kv, state.cache.lengths)
    accepted, bonus = accept(ctx, ctx.logits(hidden), drafts, draft_logits, verify_key)
    return commit(ctx, state, cache, drafts, accepted, bonus, rng, forwards=2)


def stats(final: State) -> dict[str, Any]:
    """The accepted-drafts histogram over cycles and rows, and its mean."""
    histogram = final.accepted_histogram
    cycles = int(histogram.sum())
    return {"accepted_histogram": histogram.tolist(), "cycles": cycles,
            "mean_accepted": float((histogram * np.arange(histogram.size)).sum()
                                   / max(cycles, 1))}


MODE = Mode(name="self_spec", settings=Settings, init=init, step=step, stats=stats)
