"""Self-speculation, quadratic (NVIDIA's research variant): verify and next draft in ONE forward.

LinearSpec spends two forwards a cycle: a draft of the next block, then its verification. The
quadratic variant merges the verification of this cycle's drafts with the drafting of the next
block, for every acceptance length at once. With drafts [d_0 (= the pending token), d_1..d_{T-1}] at
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
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.decode import self_spec
from nld_jax.decode.common import Context, Mode, Room, extend, row_field

__all__ = ["MODE", "Settings", "State", "init", "step", "block_layout"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Settings(self_spec.Settings):
    """LinearSpec's settings; the block is T*(T+1) tokens with an explicit pattern."""

    # Block 64 already took 156 s on CPU (4160 tokens a forward); block 100 ran out of memory.
    largest_block: ClassVar[int] = 32
    largest_block_why: ClassVar[str] = "a cycle's forward runs T*(T+1) tokens: 1056 at 32"

    def room(self) -> Room:
        size = self.block_size
        return Room(granule=size, write_ahead=size * (size + 1), whole_granules=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State(self_spec.State):
    """LinearSpec's carry, plus the drafts waiting for verification."""

    drafts: jax.Array = row_field()  # int32 [B, T]: position 0 is a placeholder for `pending`
    draft_logits: jax.Array = row_field()  # float32 [B, T, V]: what each draft was drawn from


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


def init(ctx: Context, core: self_spec.State) -> State:
    """LinearSpec's init, then one draft-only forward bootstraps the first drafts (counted as a
    forward)."""
    settings = ctx.settings
    linear = self_spec.init(ctx, core)
    rng, draft_key = jax.random.split(linear.rng)

    def bootstrap() -> jax.Array:
        return self_spec.draft_block(ctx, linear.cache, linear.pending)

    def nothing() -> jax.Array:  # every row ended at the prefill: no forward to count
        return jnp.zeros((linear.pending.shape[0], settings.block_size,
                          ctx.model.config.vocab_size), jnp.float32)

    ran = jnp.any(~linear.finished)
    draft_logits = jax.lax.cond(ran, bootstrap, nothing)
    linear = dataclasses.replace(
        linear, rng=rng, num_forwards=linear.num_forwards + ran.astype(jnp.int32),
        row_forwards=linear.row_forwards + (~linear.finished).astype(jnp.int32))
    return extend(State, linear, accepted_histogram=linear.accepted_histogram,
                  drafts=ctx.sampler(draft_logits, draft_key), draft_logits=draft_logits)


def step(ctx: Context, state: State) -> State:
    """One cycle: verify this block and draft the next one, in one forward."""
    settings = ctx.settings
    size, b = settings.block_size, state.pending.shape[0]
    rng, draft_key, verify_key = jax.random.split(state.rng, 3)
    offsets, is_mask, visible = block_layout(size)
    drafts = state.drafts.at[:, 0].set(state.pending)
    tokens = jnp.concatenate(
        [drafts, jnp.full((b, size * size), settings.mask_token_id, jnp.int32)], axis=1)
    hidden, block_kv = ctx.forward(
        tokens, state.cache, causal=True,
        lora_on=jnp.broadcast_to(jnp.asarray(is_mask), tokens.shape),
        positions=state.cache.lengths[:, None] + jnp.asarray(offsets)[None, :],
        block_mask=jnp.asarray(visible), quadratic=size)
    cache = state.cache.write(block_kv, state.cache.lengths)
    verify_logits = ctx.logits(hidden[:, :size])
    accepted, bonus = self_spec.accept(ctx, verify_logits, drafts, state.draft_logits,
                                       verify_key)
    # Group `accepted` drafts the T positions after the last accepted token; its first mask's
    # slot is the bonus's.
    rows = size + accepted[:, None] * size + jnp.arange(size)[None, :]
    draft_logits = ctx.logits(jnp.take_along_axis(hidden, rows[:, :, None], axis=1))
    state = self_spec.commit(ctx, state, cache, drafts, accepted, bonus, rng, forwards=1)
    return dataclasses.replace(state, drafts=ctx.sampler(draft_logits, draft_key),
                               draft_logits=draft_logits)


MODE = Mode(name="self_spec_quadratic", settings=Settings, init=init, step=step,
            stats=self_spec.stats)
