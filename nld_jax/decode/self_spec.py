"""Self-speculation, linear (NVIDIA's "LinearSpec"): a diffusion draft verified by a causal pass.

Each cycle: a bidirectional draft of [seed, MASK * (B-1)] (cache read, not written; LoRA on),
then a causal verify of [seed, d_1..d_{B-1}] that writes the block (LoRA off). The leading run
of drafts the verifier agrees with is accepted plus one bonus token; the cache's valid length
grows by that many, which rolls back the rejected slots for free. Two forwards per cycle.

At temperature > 0 the default is exact speculative sampling (accept d with probability
min(1, p(d)/q(d)), resample a rejection from normalize(max(0, p - q))), whose output is
distributed exactly as AR sampling; `accept_rule="match"` keeps NVIDIA's rule (sample the AR
token independently, accept the draft only if equal).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.cache import KVCache
from nld_jax.decode.common import Budget, Sampler, Stream, emit, run_loop
from nld_jax.model import NLDModel
from nld_jax.sampling import is_eos, leading_run
from nld_jax.step_kernels import greedy_verify

__all__ = ["Settings", "State", "init", "step", "done", "run", "accept", "commit", "draft_block",
           "ACCEPT_RULES"]

ACCEPT_RULES = ("exact", "match")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Settings:
    """Static settings of the cycle."""

    mask_token_id: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    accept_rule: str = dataclasses.field(default="exact", metadata=dict(static=True))
    # Greedy verification on pallas_kernels.block_step (nld_jax.step_kernels decides).
    step_kernels: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The cycle loop's carry."""

    cache: KVCache  # committed tokens; `seed` is not in it yet
    tokens: jax.Array  # int32 [B, O]: emitted tokens
    num_tokens: jax.Array  # int32 [B]
    seed: jax.Array  # int32 [B]: the newest emitted token, first of the next block
    finished: jax.Array  # bool [B]
    accepted_histogram: jax.Array  # int32 [block_size]: cycles (over rows) that accepted c drafts
    rng: jax.Array
    num_forwards: jax.Array  # int32 []: forwards after the prefill (whole batch)
    row_forwards: jax.Array  # int32 [B]: forwards each row took part in while unfinished


def init(cache: KVCache, seed: jax.Array, out_len: int, budget: Budget, rng: jax.Array,
         settings: Settings) -> State:
    """The state after the prefill emitted `seed` [B]."""
    b = seed.shape[0]
    num_tokens = jnp.ones((b,), jnp.int32)
    finished = is_eos(seed, budget.eos_ids) | (num_tokens >= budget.max_new_tokens)
    return State(cache=cache, tokens=jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(seed),
                 num_tokens=num_tokens, seed=seed, finished=finished,
                 accepted_histogram=jnp.zeros((settings.block_size,), jnp.int32), rng=rng,
                 num_forwards=jnp.zeros((), jnp.int32), row_forwards=jnp.zeros((b,), jnp.int32))


def _gather(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [B, T, ...] at index [B] -> [B, ...]."""
    return jax.vmap(lambda v, i: v[i])(values, index)


def _accept_exact(sampler: Sampler, draft_logits: jax.Array, verify_logits: jax.Array,
                  drafts: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: (accepted count c [B], the token at position c [B])."""
    b, t = drafts.shape
    log_q = sampler.log_probs(draft_logits)  # q at block position j+1 drafted d_{j+1}
    log_p = sampler.log_probs(verify_logits)  # p at position j predicts position j+1
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
    # (c = B-1) draws the bonus from p itself.
    use_residual = (accepted < t - 1) & (jnp.sum(residual, axis=-1) > 0)
    dist = jnp.where(use_residual[:, None], residual, p_c)
    bonus = jax.random.categorical(r_key, jnp.log(dist), axis=-1).astype(jnp.int32)
    return accepted, bonus


def accept(sampler: Sampler, settings: Settings, verify_logits: jax.Array, drafts: jax.Array,
           draft_logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The verifier's decision on a block: (accepted drafts c [B], the token at position c [B]).

    Args:
      verify_logits: float32 [B, T, V]: causal logits of `drafts`; position j predicts j+1.
      drafts: int32 [B, T]: [seed, d_1..d_{T-1}].
      draft_logits: float32 [B, T, V]: the logits position j's draft was drawn from (used by
        exact speculative sampling only).
    """
    sampling = sampler.temperature > 0

    def accept_matching(predicted: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Accept while the verifier's token equals the next draft; bonus = its token there."""
        accepted = leading_run(predicted[:, :-1] == drafts[:, 1:])
        return accepted, _gather(predicted, accepted)

    def accept_greedy() -> tuple[jax.Array, jax.Array]:
        if settings.step_kernels:
            return greedy_verify(verify_logits, drafts)
        return accept_matching(jnp.argmax(verify_logits, axis=-1).astype(jnp.int32))

    def accept_sampled() -> tuple[jax.Array, jax.Array]:
        if settings.accept_rule == "match":
            return accept_matching(sampler(verify_logits, key))
        return _accept_exact(sampler, draft_logits, verify_logits, drafts, key)

    return jax.lax.cond(sampling, accept_sampled, accept_greedy)


def commit(state: State, cache: KVCache, drafts: jax.Array, accepted: jax.Array,
           bonus: jax.Array, budget: Budget, rng: jax.Array, forwards: int) -> State:
    """Emits the accepted drafts and the bonus, advances the cache past them (the rest of the
    written block stays invalid: the rollback) and counts `forwards` for the cycle."""
    size = drafts.shape[1]
    active = ~state.finished
    positions = jnp.arange(size)[None, :]
    next_drafts = jnp.concatenate([drafts[:, 1:], drafts[:, -1:]], axis=1)
    emitted = jnp.where(positions < accepted[:, None], next_drafts, bonus[:, None])
    room = budget.max_new_tokens - state.num_tokens
    counts = jnp.where(active, jnp.minimum(accepted + 1, room), 0)
    tokens, num_tokens = emit(state.tokens, state.num_tokens, emitted, counts)
    eos_emitted = jnp.any(is_eos(emitted, budget.eos_ids) & (positions < counts[:, None]), axis=1)
    finished = state.finished | eos_emitted | (num_tokens >= budget.max_new_tokens)
    histogram = state.accepted_histogram + jnp.sum(
        jax.nn.one_hot(accepted, size, dtype=jnp.int32) * active[:, None], axis=0)
    return State(cache=cache.advance(jnp.where(active, accepted + 1, 0)), tokens=tokens,
                 num_tokens=num_tokens, seed=jnp.where(active, bonus, state.seed),
                 finished=finished, accepted_histogram=histogram, rng=rng,
                 num_forwards=state.num_forwards + forwards,
                 row_forwards=state.row_forwards + forwards * active.astype(jnp.int32))


def draft_block(model: NLDModel, cache: KVCache, seed: jax.Array, mask_token_id: int,
                size: int) -> jax.Array:
    """The draft pass: logits [B, T, V] of [seed, MASK * (T-1)], bidirectional, against the
    cache without writing it, the adapter on. Position j's logits draft position j."""
    block = jnp.full((seed.shape[0], size), mask_token_id, jnp.int32).at[:, 0].set(seed)
    logits, _ = model.forward_block(block, cache, causal=False, write=False, lora_on=True)
    return logits


def step(model: NLDModel, sampler: Sampler, budget: Budget, settings: Settings,
         state: State) -> State:
    """One draft + verify cycle."""
    rng, draft_key, verify_key = jax.random.split(state.rng, 3)
    draft_logits = draft_block(model, state.cache, state.seed, settings.mask_token_id,
                               settings.block_size)
    drafts = sampler(draft_logits, draft_key).at[:, 0].set(state.seed)  # [B, T]
    verify_logits, cache = model.forward_block(drafts, state.cache, causal=True, write=True,
                                               lora_on=False)
    accepted, bonus = accept(sampler, settings, verify_logits, drafts, draft_logits, verify_key)
    return commit(state, cache, drafts, accepted, bonus, budget, rng, forwards=2)


def done(state: State) -> jax.Array:
    """Every row has finished."""
    return jnp.all(state.finished)


def run(model: NLDModel, sampler: Sampler, budget: Budget, settings: Settings,
        state: State, stream: Stream | None = None) -> State:
    """Cycles until every row has finished; with `stream`, sends each cycle's tokens to the host."""
    return run_loop(lambda s: step(model, sampler, budget, settings, s), done, state, stream)
