"""AR mode: one causal forward per token against the KV cache."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from nld_jax.config import NLDConfig
from nld_jax.decode import common
from nld_jax.decode.common import Context, Core, Mode, Options, Room, emit_pending

__all__ = ["MODE", "Settings", "init", "step", "stats"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Settings(common.Settings):
    """AR has no options."""

    @classmethod
    def from_options(cls, config: NLDConfig, options: Options) -> Settings:
        return cls()

    def room(self) -> Room:
        # One token a step, never past the budget; a finished row's write lands on its first
        # invalid slot, which the budget leaves room for.
        return Room(granule=1, write_ahead=0, whole_granules=False)


def init(ctx: Context, core: Core) -> Core:
    """The prefill's token is the first emitted."""
    return emit_pending(ctx, core, jnp.ones_like(core.finished))


def step(ctx: Context, state: Core) -> Core:
    """Feeds `pending` through the network (writing its K/V) and samples the next token."""
    active = ~state.finished
    hidden, block_kv = ctx.forward(state.pending[:, None], state.cache, causal=True)
    # Finished rows keep their length; their write lands on an invalid slot.
    cache = state.cache.write(block_kv, state.cache.lengths).advance(active)
    rng, key = jax.random.split(state.rng)
    token = ctx.sampler(ctx.logits(hidden)[:, 0], key)
    state = dataclasses.replace(
        state, cache=cache, pending=jnp.where(active, token, state.pending), rng=rng,
        num_forwards=state.num_forwards + 1,
        row_forwards=state.row_forwards + active.astype(jnp.int32))
    return emit_pending(ctx, state, active)


def stats(final: Any) -> dict[str, Any]:
    """AR has no figures beyond generate()'s own."""
    return {}


MODE = Mode(name="ar", settings=Settings, init=init, step=step, stats=stats)
