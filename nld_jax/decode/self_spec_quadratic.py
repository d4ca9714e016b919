"""Self-speculation, quadratic (NVIDIA's research variant): verify and next draft in ONE forward.

LinearSpec spends two forwards a cycle: a draft of the next block, then its verification. The
quadratic variant merges the verification of this cycle's drafts with the drafting of the next
block, for every acceptance length at once. With drafts [d_0 (= the seed), d_1..d_{T-1}] at
positions L..L+T-1, one forward runs T + T*T tokens:

    chain   d_0 .. d_{T-1}                  at L+i;      d_i sees the prefix and d_0..d_i
    group i MASK * T (i = 0..T-1)           at L+i+1 .. L+i+T; sees the prefix, d_0..d_i and
                                                         its own group (bidirectionally)

The chain is exactly LinearSpec's causal verify (adapter off; its K/V are written at L..L+T-1,
the groups' K/V land past them and stay invalid). Group i is a diffusion draft of the T tokens
that follow d_i, so whatever the acceptance count c turns out to be, group c holds the next
block's draft: its first mask sits where the bonus token goes (the bonus replaces it), the other
T-1 are the next drafts. Acceptance, the bonus, emitting and the rollback are LinearSpec's, so
the greedy output equals AR greedy and sampled outputs follow the AR distribution (exact
speculative sampling by default, NVIDIA's match rule with accept_rule="match").

One forward a cycle, plus one draft-only forward after the prefill to bootstrap the first
drafts; the price is a block of T*(T+1) tokens (1056 at T=32) and T*(T+1) cache slots of room.
Only 2T positions go through the output head: the chain, and the one group that is needed.
The explicit block mask runs attention on the XLA path (the Pallas kernel takes causal or
bidirectional blocks only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.cache import KVCache
from nld_jax.decode import self_spec
from nld_jax.decode.common import Budget, Sampler, Stream, run_loop
from nld_jax.model import NLDModel

__all__ = ["State", "init", "step", "done", "run", "block_layout"]

Settings = self_spec.Settings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The cycle loop's carry: LinearSpec's, plus the drafts waiting for verification."""

    core: self_spec.State
    drafts: jax.Array  # int32 [B, T]: position 0 is a placeholder for the seed
    draft_logits: jax.Array  # float32 [B, T, V]: what each draft was drawn from


def block_layout(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The static layout of one cycle's T*(T+1)-token block.

    Returns:
      (offsets int32 [N]: position of each token relative to L; is_mask bool [N]: a group's
      mask (adapter on) rather than a chain draft; visible bool [N, N] (query, key)).
    """
    chain = np.arange(size)
    group = np.repeat(chain, size)  # the chain token each mask's group hangs off
    slot = np.tile(np.arange(1, size + 1), size)  # 1..T within the group
    offsets = np.concatenate([chain, group + slot]).astype(np.int32)
    owner = np.concatenate([chain, group])  # chain token i, or the group's i
    is_mask = np.concatenate([np.zeros(size, bool), np.ones(size * size, bool)])
    # Every token sees the chain up to its own i (for the chain itself: causal) ...
    visible = ~is_mask[None, :] & (owner[None, :] <= owner[:, None])
    # ... and a group's masks see the whole group.
    visible |= is_mask[:, None] & is_mask[None, :] & (owner[:, None] == owner[None, :])
    return offsets, is_mask, visible


def init(model: NLDModel, sampler: Sampler, cache: KVCache, seed: jax.Array, out_len: int,
         budget: Budget, rng: jax.Array, settings: Settings) -> State:
    """The state after the prefill emitted `seed` [B]: one draft-only forward bootstraps the
    first drafts (counted as a forward)."""
    rng, draft_key = jax.random.split(rng)
    core = self_spec.init(cache, seed, out_len, budget, rng, settings)

    def bootstrap() -> jax.Array:
        return self_spec.draft_block(model, cache, seed, settings.mask_token_id,
                                     settings.block_size)

    def nothing() -> jax.Array:  # every row ended at the prefill: no forward to count
        return jnp.zeros((seed.shape[0], settings.block_size, model.config.vocab_size),
                         jnp.float32)

    ran = jnp.any(~core.finished)
    draft_logits = jax.lax.cond(ran, bootstrap, nothing)
    core = dataclasses.replace(core, num_forwards=core.num_forwards + ran.astype(jnp.int32),
                               row_forwards=core.row_forwards + (~core.finished).astype(jnp.int32))
    return State(core=core, drafts=sampler(draft_logits, draft_key), draft_logits=draft_logits)


def step(model: NLDModel, sampler: Sampler, budget: Budget, settings: Settings,
         state: State) -> State:
    """One cycle: verify this block and draft the next one, in one forward."""
    core, size = state.core, settings.block_size
    b = core.seed.shape[0]
    rng, draft_key, verify_key = jax.random.split(core.rng, 3)
    offsets, is_mask, visible = block_layout(size)
    drafts = state.drafts.at[:, 0].set(core.seed)
    tokens = jnp.concatenate(
        [drafts, jnp.full((b, size * size), settings.mask_token_id, jnp.int32)], axis=1)
    hidden, cache = model.forward_block(
        tokens, core.cache, causal=True, write=True,
        lora_on=jnp.broadcast_to(jnp.asarray(is_mask), tokens.shape),
        positions=core.cache.lengths[:, None] + jnp.asarray(offsets)[None, :],
        block_mask=jnp.asarray(visible), return_hidden=True)
    verify_logits = model.logits(hidden[:, :size])
    accepted, bonus = self_spec.accept(sampler, settings, verify_logits, drafts,
                                       state.draft_logits, verify_key)
    # Group `accepted` drafts the T positions after the last accepted token; its first mask's
    # slot is the bonus's.
    rows = size + accepted[:, None] * size + jnp.arange(size)[None, :]
    group = jnp.take_along_axis(hidden, rows[:, :, None], axis=1)
    draft_logits = model.logits(group)
    core = self_spec.commit(core, cache, drafts, accepted, bonus, budget, rng, forwards=1)
    return State(core=core, drafts=sampler(draft_logits, draft_key), draft_logits=draft_logits)


def done(state: State) -> jax.Array:
    """Every row has finished."""
    return jnp.all(state.core.finished)


def run(model: NLDModel, sampler: Sampler, budget: Budget, settings: Settings,
        state: State, stream: Stream | None = None) -> State:
    """Cycles until every row has finished; with `stream`, sends each cycle's tokens to the host."""
    return run_loop(lambda s: step(model, sampler, budget, settings, s), done, state, stream,
                    emitted=lambda s: s.core)
