"""What every decoding mode shares: the mode interface, the context, the core state, the loop.

A decoding mode is one module in nld_jax/decode/ that defines
- `Settings`: a pytree dataclass built from the user's options by `Settings.from_options`
  (validated there, with named errors); static fields shape the program, array fields are traced.
  `room()` says how much output buffer and cache the mode needs past the prompt and the budget.
- `State`: the loop carry, a dataclass extending `Core` with the mode's own fields.
- `init(ctx, core) -> State` after the prefill, `step(ctx, state) -> State` (the loop body) and
  `stats(final_state) -> dict` (host side, the mode's figures for GenerationOutput.stats);
- `MODE = Mode(...)` bundling them, registered by name in nld_jax/decode/__init__.py.
`start` (prefill + init) and `run_loop` (the one while_loop, with streaming) run any of them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from nld_jax.cache import BlockKV, KVCache
from nld_jax.config import NLDConfig
from nld_jax.decode.prefill import prefill
from nld_jax.kernels import Kernels
from nld_jax.limits import ResourceLimitError
from nld_jax.model import NLDModel
from nld_jax.sampling import filter_logits, is_eos, sample_tokens

__all__ = ["Options", "Room", "Settings", "BlockSettings", "Mode", "Context", "Sampler", "Core",
           "Stream", "row_field", "extend", "emit", "emit_pending", "start", "run_loop",
           "replace_rows", "register_stream", "unregister_stream", "block_size_option"]

# Host handlers of streaming generate() calls, by stream id. The compiled program holds only
# the module-level _deliver, so any handler reuses it; the id is a traced argument.
_STREAM_HANDLERS: dict[int, Callable[[np.ndarray, np.ndarray], None]] = {}
_STREAM_IDS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Options:
    """The mode options a user passes to generate(); each mode's Settings reads what it uses."""

    block_size: int | None = None  # None: config.block_size
    threshold: float | None = 0.9
    denoise_steps: int | None = None
    all_mask_init: bool = False
    accept_rule: str = "exact"


@dataclasses.dataclass(frozen=True)
class Room:
    """What a mode needs past the prompt and the budget."""

    granule: int  # most tokens one step emits; the output buffer gets whole granules plus one
    write_ahead: int  # cache slots a forward writes past the valid length
    whole_granules: bool  # the budget is rounded up to whole granules (whole blocks emitted)


class Settings:
    """Base of every mode's settings (each a jax.tree_util.register_dataclass dataclass)."""

    @classmethod
    def from_options(cls, config: NLDConfig, options: Options) -> Self:
        """The settings for this request; ValueError naming the bad option."""
        raise NotImplementedError

    def room(self) -> Room:
        """The output and cache room the mode needs (see Room)."""
        raise NotImplementedError

    @property
    def step_block(self) -> int | None:
        """The block the greedy step kernels would take (None: the mode has no such step)."""
        return None


@dataclasses.dataclass(frozen=True)
class BlockSettings(Settings):
    """Settings of a mode that works on blocks of T tokens (each subclass registers itself
    with jax.tree_util.register_dataclass)."""

    mask_token_id: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    whole_blocks: ClassVar[bool] = False  # the budget rounds up to whole blocks
    # The largest block_size the mode accepts, and why (a stated limit instead of a call that
    # runs for minutes or exhausts memory). A forward of a block of T runs T tokens.
    largest_block: ClassVar[int] = 256
    largest_block_why: ClassVar[str] = "a forward runs T tokens against the whole cache"

    def room(self) -> Room:
        # Up to a block a step, and a forward that commits writes a block past the valid length.
        return Room(granule=self.block_size, write_ahead=self.block_size,
                    whole_granules=self.whole_blocks)

    @property
    def step_block(self) -> int:
        return self.block_size


def block_size_option(config: NLDConfig, options: Options,
                      settings: type[BlockSettings]) -> int:
    """The validated block size of a block mode (at most settings.largest_block)."""
    block = config.block_size if options.block_size is None else options.block_size
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block_size={block!r} must be an integer, got {type(block).__name__}")
    if block < 2:
        raise ValueError(f"block_size={block!r} must be an integer >= 2")
    if block > settings.largest_block:
        raise ResourceLimitError(
            f"block_size={block} is larger than this mode's largest block, "
            f"{settings.largest_block} ({settings.largest_block_why})")
    return int(block)


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


@dataclasses.dataclass(frozen=True)
class Context:
    """What a decode loop works with, fixed for the whole program."""

    model: NLDModel
    sampler: Sampler
    eos_ids: jax.Array  # int32 [E]: any of these ends a row (traced: no recompile per EOS set)
    settings: Any  # the mode's Settings
    kernels: Kernels

    def forward(self, tokens: jax.Array, cache: KVCache | None, *, causal: jax.Array | bool,
                lora_on: jax.Array | bool = False, positions: jax.Array | None = None,
                block_mask: jax.Array | None = None, quadratic: int = 0,
                images: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, BlockKV]:
        """model.forward with the program's attention kernel wherever it applies: a cache, and
        no explicit block mask or the quadratic pattern, which the kernel computes itself
        (`quadratic` = b names it; `block_mask` spells it out for the XLA path)."""
        kernel = self.kernels.attention and cache is not None and (
            block_mask is None or quadratic > 0)
        return self.model.forward(tokens, cache, causal=causal, lora_on=lora_on,
                                  positions=positions,
                                  block_mask=None if kernel and quadratic else block_mask,
                                  attention_kernel=kernel, quadratic=quadratic if kernel else 0,
                                  images=images)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The head on the hidden states of the rows a step needs."""
        return self.model.logits(hidden)


def row_field(axis: int = 0) -> Any:
    """A state field whose `axis` is the batch: `replace_rows` swaps its rows."""
    return dataclasses.field(metadata=dict(row_axis=axis))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Core:
    """The state every mode's loop carries (each mode's State extends it)."""

    cache: KVCache  # committed tokens; `pending` is not in it yet
    tokens: jax.Array = row_field()  # int32 [B, O]: emitted tokens, valid up to num_tokens[b]
    num_tokens: jax.Array = row_field()  # int32 [B]
    pending: jax.Array = row_field()  # int32 [B]: the newest sampled token, fed next
    finished: jax.Array = row_field()  # bool [B]: EOS emitted or budget reached
    max_new_tokens: jax.Array = row_field()  # int32 [B]: each row's budget
    rng: jax.Array  # PRNG key
    num_forwards: jax.Array  # int32 []: forwards after the prefill (whole batch)
    row_forwards: jax.Array = row_field()  # int32 [B]: forwards each row took while unfinished


def extend[S: Core](cls: type[S], core: Core, **fields: Any) -> S:
    """A mode's State from the core fields and the mode's own."""
    return cls(**{f.name: getattr(core, f.name) for f in dataclasses.fields(Core)}, **fields)


@dataclasses.dataclass(frozen=True)
class Mode:
    """A decoding mode: what generate() needs to run it (see the module docstring)."""

    name: str
    settings: type[Settings]
    init: Callable[[Context, Core], Core]
    step: Callable[[Context, Core], Core]
    stats: Callable[[Any], dict[str, Any]]


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


def emit_pending[S: Core](ctx: Context, state: S, rows: jax.Array) -> S:
    """Emits the pending token of `rows` (bool [B]); a row ends on EOS or its budget."""
    tokens, num_tokens = emit(state.tokens, state.num_tokens, state.pending[:, None],
                              rows.astype(jnp.int32))
    ended = rows & (is_eos(state.pending, ctx.eos_ids) | (num_tokens >= state.max_new_tokens))
    return dataclasses.replace(state, tokens=tokens, num_tokens=num_tokens,
                               finished=state.finished | ended)


def start(ctx: Context, mode: Mode, prompts: jax.Array, prompt_lengths: jax.Array,
          cache: KVCache, out_len: int, max_new_tokens: jax.Array, rng: jax.Array,
          images: tuple[jax.Array, jax.Array] | None = None,
          prefill_chunk: int | None = None) -> Core:
    """The prefill and the mode's init: the state its loop starts from.

    Args:
      prompts, prompt_lengths, cache, images: as nld_jax.decode.prefill.prefill (right-padded
        prompts [B, P], their lengths [B], an empty cache of at least P slots, a VLM's images).
      out_len: O, the output buffer per row.
      max_new_tokens: int32 [B] each row's budget.
      prefill_chunk: static; prompts wider than this are prefilled in chunks of it.
    """
    last, cache = prefill(ctx, prompts, prompt_lengths, cache, prefill_chunk, images)
    prefill_rng, loop_rng = jax.random.split(rng)
    b = prompts.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    core = Core(cache=cache, tokens=jnp.zeros((b, out_len), jnp.int32), num_tokens=zeros,
                pending=ctx.sampler(ctx.logits(last)[:, 0], prefill_rng),
                finished=jnp.zeros((b,), bool),
                max_new_tokens=jnp.broadcast_to(max_new_tokens, (b,)).astype(jnp.int32),
                rng=loop_rng, num_forwards=jnp.zeros((), jnp.int32), row_forwards=zeros)
    return mode.init(ctx, core)


def replace_rows[S](state: S, rows: jax.Array, new: S) -> S:
    """`state` with its rows `rows` (int [R]) taken from `new` (the same mode's state, batch R,
    same buffers): between program calls, finished rows' slots go to new prompts."""
    changes = {}
    for field in dataclasses.fields(state):
        old, fresh = getattr(state, field.name), getattr(new, field.name)
        if dataclasses.is_dataclass(old):
            changes[field.name] = replace_rows(old, rows, fresh)
        elif "row_axis" in field.metadata:
            index = (slice(None),) * field.metadata["row_axis"] + (rows,)
            changes[field.name] = old.at[index].set(fresh)
    return dataclasses.replace(state, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stream:
    """Streaming on: after every emit the loop sends its output buffer to a host handler.

    `run_loop` takes `stream=None` for no streaming; since None is part of the traced
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


def _notify(stream: Stream | None, state: Core) -> None:
    """Sends state.tokens and state.num_tokens to the host (nothing when stream is None)."""
    if stream is None:
        return
    # ordered: the host sees the buffers in loop order, so counts only grow.
    io_callback(_deliver, None, stream.stream_id, state.tokens, state.num_tokens, ordered=True)


def run_loop[S: Core](ctx: Context, mode: Mode, state: S, stream: Stream | None) -> S:
    """The mode's decode loop: `step` until every row has finished, as one lax.while_loop.

    With `stream`, the output buffer goes to the host when the loop starts (the tokens the init
    emitted) and after every step.
    """
    _notify(stream, state)

    def body(state: S) -> S:
        state = mode.step(ctx, state)
        _notify(stream, state)
        return state

    return jax.lax.while_loop(lambda s: ~jnp.all(s.finished), body, state)
