"""AR mode: one causal forward per token against the KV cache, in one lax.while_loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.cache import KVCache
from nld_jax.decode.common import Budget, Sampler, Stream, emit, run_loop
from nld_jax.model import NLDModel
from nld_jax.sampling import is_eos

__all__ = ["State", "init", "step", "done", "run"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The AR loop's carry."""

    cache: KVCache  # committed tokens; `last` is not in it yet
    tokens: jax.Array  # int32 [B, O]: emitted tokens, row b valid up to num_tokens[b]
    num_tokens: jax.Array  # int32 [B]
    last: jax.Array  # int32 [B]: the newest emitted token, to be fed next
    finished: jax.Array  # bool [B]: EOS emitted or budget reached
    rng: jax.Array  # PRNG key
    num_forwards: jax.Array  # int32 []: forwards after the prefill
    row_forwards: jax.Array  # int32 [B]: forwards each row took part in while unfinished


def init(cache: KVCache, seed: jax.Array, out_len: int, budget: Budget, rng: jax.Array) -> State:
    """The state after the prefill emitted `seed` [B]."""
    b = seed.shape[0]
    tokens = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(seed)
    num_tokens = jnp.ones((b,), jnp.int32)
    finished = is_eos(seed, budget.eos_ids) | (num_tokens >= budget.max_new_tokens)
    return State(cache=cache, tokens=tokens, num_tokens=num_tokens, last=seed, finished=finished,
                 rng=rng, num_forwards=jnp.zeros((), jnp.int32),
                 row_forwards=jnp.zeros((b,), jnp.int32))


def step(model: NLDModel, sampler: Sampler, budget: Budget, state: State) -> State:
    """Feeds `last` through the network (writing its K/V) and samples the next token."""
    logits, cache = model.forward_block(state.last[:, None], state.cache, causal=True, write=True)
    # Finished rows keep their length; their write lands on an invalid slot.
    cache = cache.advance(~state.finished)
    rng, key = jax.random.split(state.rng)
    token = sampler(logits[:, 0], key)
    tokens, num_tokens = emit(state.tokens, state.num_tokens, token[:, None],
                              jnp.where(state.finished, 0, 1))
    finished = state.finished | is_eos(token, budget.eos_ids) | (
        num_tokens >= budget.max_new_tokens)
    return State(cache=cache, tokens=tokens, num_tokens=num_tokens,
                 last=jnp.where(state.finished, state.last, token), finished=finished, rng=rng,
                 num_forwards=state.num_forwards + 1,
                 row_forwards=state.row_forwards + (~state.finished).astype(jnp.int32))


def done(state: State) -> jax.Array:
    """Every row has finished."""
    return jnp.all(state.finished)


def run(model: NLDModel, sampler: Sampler, budget: Budget, state: State,
        stream: Stream | None = None) -> State:
    """Steps until every row has finished; with `stream`, sends every token to the host."""
    return run_loop(lambda s: step(model, sampler, budget, s), done, state, stream)
