"""Pieces every decoding mode shares: the sampler settings, the budget, emitting, streaming."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from nld_jax.sampling import filter_logits, sample_tokens

__all__ = ["Sampler", "Budget", "Stream", "emit", "notify", "run_loop", "register_stream",
           "unregister_stream"]

# Host handlers of streaming generate() calls, by stream id. The compiled program holds only
# the module-level _deliver, so any handler reuses it; the id is a traced argument.
_STREAM_HANDLERS: dict[int, Callable[[np.ndarray, np.ndarray], None]] = {}
_STREAM_IDS = itertools.count()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are chosen; temperature and top_p are traced, top_k is static."""

    temperature: jax.Array  # float32 []: 0 = greedy
    top_p: jax.Array  # float32 []: 1 = off
    top_k: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0 = off

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return sample_tokens(logits, rng, self.temperature, top_k=self.top_k, top_p=self.top_p)

    def log_probs(self, logits: jax.Array) -> jax.Array:
        """float32 [..., V]: log of the distribution tokens are drawn from at temperature > 0."""
        filtered = filter_logits(logits, self.temperature, top_k=self.top_k, top_p=self.top_p)
        return jax.nn.log_softmax(filtered, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Budget:
    """When a row stops."""

    max_new_tokens: jax.Array  # int32 []: traced, so budgets in one bucket share a program
    eos_ids: jax.Array  # int32 [E]: any of these ends a row (traced: no recompile per EOS set)


def emit(tokens: jax.Array, num_tokens: jax.Array, new: jax.Array,
         counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Appends new[b, :counts[b]] to row b of the output buffer.

    Args:
      tokens: int32 [B, O] the output buffer.
      num_tokens: int32 [B] tokens already in each row.
      new: int32 [B, C] candidates.
      counts: int32 [B] how many of them to append (0..C).
    Returns:
      (the buffer, the new counts).
    """
    c = new.shape[1]
    offsets = jnp.arange(c, dtype=jnp.int32)[None, :]
    # Slots past a row's count point beyond the buffer and are dropped.
    index = jnp.where(offsets < counts[:, None], num_tokens[:, None] + offsets, tokens.shape[1])
    rows = jnp.arange(tokens.shape[0])[:, None]
    return tokens.at[rows, index].set(new, mode="drop"), num_tokens + counts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stream:
    """Streaming on: after every emit the loop sends its output buffer to a host handler.

    A mode's `run` takes `stream=None` for no streaming; since None is part of the traced
    structure, a program without streaming holds no callback at all.
    """

    stream_id: jax.Array  # int32 []: the handler's key (from register_stream)


def register_stream(handler: Callable[[np.ndarray, np.ndarray], None]) -> int:
    """Registers handler(tokens int32 [B, O], num_tokens int32 [B]); returns its stream id."""
    stream_id = next(_STREAM_IDS) % 2**31
    _STREAM_HANDLERS[stream_id] = handler
    return stream_id


def unregister_stream(stream_id: int) -> None:
    """Removes a handler (its program has finished)."""
    _STREAM_HANDLERS.pop(stream_id, None)


def _deliver(stream_id: np.ndarray, tokens: np.ndarray, num_tokens: np.ndarray) -> None:
    handler = _STREAM_HANDLERS.get(int(stream_id))
    if handler is not None:
        handler(np.asarray(tokens), np.asarray(num_tokens))


def notify(stream: Stream | None, state: Any) -> None:
    """Sends state.tokens and state.num_tokens to the host (nothing when stream is None)."""
    if stream is None:
        return
    # ordered: the host sees the buffers in loop order, so counts only grow.
    io_callback(_deliver, None, stream.stream_id, state.tokens, state.num_tokens, ordered=True)


def run_loop[S](step: Callable[[S], S], done: Callable[[S], jax.Array], state: S,
                stream: Stream | None, emitted: Callable[[S], Any] = lambda state: state) -> S:
    """A mode's decode loop: `step` until `done`, as one lax.while_loop.

    With `stream`, `emitted(state)` (whatever holds .tokens and .num_tokens) goes to the host
    when the loop starts (the prefill's token) and after every step.
    """
    notify(stream, emitted(state))

    def body(state: S) -> S:
        state = step(state)
        notify(stream, emitted(state))
        return state

    return jax.lax.while_loop(lambda s: ~done(s), body, state)
