"""generate(): validate, bucket, prefill and run one decoding mode as one XLA program.

generate() knows no mode by name: it looks the mode up in nld_jax.decode.REGISTRY, lets the
mode's Settings validate its options and say how much room it needs, and runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nld_jax import checks, limits
from nld_jax.cache import KVCache
from nld_jax.decode import DEFAULT_MODE, REGISTRY
from nld_jax.decode.common import (
    Context,
    Mode,
    Options,
    Room,
    Sampler,
    Stream,
    register_stream,
    run_loop,
    start,
    unregister_stream,
)
from nld_jax.kernels import Kernels
from nld_jax.model import NLDModel
from nld_jax.sharding import CACHE_AXES, Layout
from nld_jax.vision import patch_bucket, prepare_images

__all__ = ["generate", "GenerationOutput", "MODES"]

MODES = tuple(REGISTRY)
_MIN_BUCKET = 16
_FINE_BUCKETS_FROM = 4096


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What generate() returns."""

    tokens: list[list[int]]  # new tokens of each prompt, up to and including the first EOS
    num_forwards: int  # network forwards after the prefill, for the whole batch
    stats: dict[str, Any]  # per-mode figures
    texts: list[str] | None = None  # the tokens decoded, when the model has a tokenizer


def _bucket(n: int) -> int:
    """The bucket of a length n: lengths in one bucket share a program (and its cache size).

    Up to _FINE_BUCKETS_FROM the next power of two >= n (at least _MIN_BUCKET): few programs
    for short prompts. Past it the power-of-two step would cost up to twice the cache a long
    prompt needs (16385 tokens -> 32768 slots), so the buckets are the vision tower's
    4/5/6/7 x 2^k (at most 25% over n, multiples of 1024, four per octave).
    """
    if n > _FINE_BUCKETS_FROM:
        return patch_bucket(n)
    return max(_MIN_BUCKET, 1 << (n - 1).bit_length())


def _encode_strings(prompts: Any, tokenizer: Any) -> Any:
    """A list whose items are strings -> token ids, with the model's tokenizer."""
    strings = isinstance(prompts, str) or (isinstance(prompts, Sequence)
                                           and any(isinstance(p, str) for p in prompts))
    if not strings:
        return prompts
    if tokenizer is None:
        raise TypeError("prompts are strings but no tokenizer is attached; pass token ids")
    if isinstance(prompts, str):
        raise TypeError("prompts is one str; pass a list of prompts, e.g. [text]")
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]


def _as_row(index: int, prompt: Any) -> np.ndarray:
    """One prompt as a 1-D array, without letting numpy guess at nested or mixed items."""
    if isinstance(prompt, (np.ndarray, jax.Array)):
        return np.asarray(prompt)
    if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)):
        raise TypeError(f"prompt {index} must be a list of token ids, got "
                        f"{type(prompt).__name__}")
    for j, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"prompt {index} item {j} is {token!r:.40}; token ids must be "
                            "integers (a prompt is a flat list of token ids)")
    return np.array([int(t) for t in prompt], dtype=object if prompt else np.int32)


def _as_rows(prompts: Any, vocab_size: int) -> list[np.ndarray]:
    """Validates prompts and returns them as int32 rows."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(f"prompts array must be [B, T], got shape {array.shape}")
        rows = list(array)
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [_as_row(i, p) for i, p in enumerate(prompts)]
    else:
        raise TypeError(f"prompts must be a list of token-id lists or an int array [B, T], "
                        f"got {type(prompts).__name__}")
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {row.shape}")
        if row.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if row.dtype != object and not np.issubdtype(row.dtype, np.integer):
            raise TypeError(f"prompt {i} holds {row.dtype} values; token ids must be integers")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary "
                             f"[0, {vocab_size})")
        out.append(row.astype(np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that changes shapes or control flow (a jit static argument)."""

    mode: Mode
    capacity: int  # S: cache slots
    out_len: int  # O: output buffer per row
    top_k: int
    kernels: Kernels
    prefill_chunk: int  # prompts wider than this are prefilled in chunks of it
    layout: Layout | None  # the model's mesh and sharding rules (None: one device)


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _program(graphdef: nnx.GraphDef, state: nnx.State, settings: Any, prompts: jax.Array,
             prompt_lengths: jax.Array, max_new_tokens: jax.Array, rng: jax.Array,
             temperature: jax.Array, top_p: jax.Array, eos_ids: jax.Array,
             stream: Stream | None, images: tuple[jax.Array, jax.Array] | None, *,
             static: _Static) -> Any:
    """Prefill and the whole decode loop of one mode, as one program.

    `settings` is the mode's Settings (its static fields are part of the program's identity).
    `stream` is None (no host callback in the program) or a Stream: None and a Stream are
    different pytree structures, so each gets its own compiled program. Returns the final state
    without its cache.
    """
    model: NLDModel = nnx.merge(graphdef, state)
    config = model.config
    ctx = Context(model=model, sampler=Sampler(temperature=temperature, top_p=top_p,
                                               top_k=static.top_k),
                  eos_ids=eos_ids, settings=settings, kernels=static.kernels)
    cache = KVCache.empty(num_layers=config.num_hidden_layers, batch=prompts.shape[0],
                          capacity=static.capacity, num_kv_heads=config.num_key_value_heads,
                          head_dim=config.head_dim, dtype=model.dtype)
    if static.layout is not None:  # KV cache over kv heads and batch rows, prompts over rows
        cache = jax.lax.with_sharding_constraint(cache, KVCache(
            k=static.layout.sharding(CACHE_AXES), v=static.layout.sharding(CACHE_AXES),
            lengths=static.layout.sharding(("batch",))))
        prompts = jax.lax.with_sharding_constraint(prompts, static.layout.sharding(("batch", None)))
    initial = start(ctx, static.mode, prompts, prompt_lengths, cache, static.out_len,
                    max_new_tokens, rng, images, prefill_chunk=static.prefill_chunk)
    final = dataclasses.replace(run_loop(ctx, static.mode, initial, stream), cache=None)
    if static.layout is not None:  # every process reads the whole result (multi-host too)
        final = jax.lax.with_sharding_constraint(final, static.layout.sharding(()))
    return final


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sizes(room: Room, longest: int, max_new_tokens: int, max_cache_len: int | None,
           limit: int, prefill_chunk: int) -> tuple[int, int, int]:
    """(prompt bucket, output buffer O, cache slots S) for a request, or ValueError."""
    budget = _round_up(max_new_tokens, room.granule) if room.whole_granules else max_new_tokens
    needed = longest + budget
    if needed > limit:
        which = "config.max_position_embeddings" if max_cache_len is None else "max_cache_len"
        raise ValueError(f"the longest prompt ({longest} tokens) plus {max_new_tokens=} needs "
                         f"{needed} positions, more than {which}={limit}")
    prompt_bucket = _bucket(longest)
    if prompt_bucket > prefill_chunk:  # a chunked prefill reads whole chunks of the prompts
        prompt_bucket = _round_up(prompt_bucket, prefill_chunk)
    out_room = _round_up(_bucket(max_new_tokens), room.granule)
    # A step may emit a granule past the budget, and a forward writes room.write_ahead slots
    # past the valid length: a write clamped at the cache's end would overwrite valid slots.
    out_len = out_room + room.granule
    capacity = prompt_bucket + out_room + room.write_ahead
    if max_cache_len is not None:
        # The prefill writes the whole padded prompt.
        capacity = max(max_cache_len + room.write_ahead, prompt_bucket)
    # Whole 64-key tiles, as the attention kernel reads them.
    return prompt_bucket, out_len, _round_up(capacity, 64)


def _eos_ids(config: Any, eos_token_ids: Any) -> tuple[int, ...]:
    """The stop set: config.eos_token_ids, or the given token ids, checked."""
    if eos_token_ids is None:
        return tuple(config.eos_token_ids)
    if isinstance(eos_token_ids, (str, bytes)) or not isinstance(
            eos_token_ids, (Sequence, np.ndarray)):
        raise TypeError(f"eos_token_ids={eos_token_ids!r} must be a list of token ids")
    if len(eos_token_ids) == 0:
        raise ValueError("eos_token_ids=[] must name at least one token")
    ids = tuple(eos_token_ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"eos_token_ids={ids!r}: {token!r} is not a token id (an integer)")
        if not 0 <= token < config.vocab_size:
            raise ValueError(f"eos_token_ids={ids!r} must be token ids in "
                             f"[0, {config.vocab_size})")
    return tuple(int(t) for t in ids)


def _pad_ids(ids: tuple[int, ...], multiple: int = 8) -> list[int]:
    """EOS sets padded (with their first id) to a multiple of 8, so their size rarely recompiles."""
    return list(ids) + [ids[0]] * (-len(ids) % multiple)


def _truncate_after_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1]
    return tokens


class _StreamHandler:
    """Host side of streaming: turns output buffers into each row's newly committed tokens.

    The program sends the whole buffer when its loop starts and after every step; this keeps
    how much of each row was passed on, cuts rows after their first EOS (as the final output),
    and calls the user's callback each time with one list per row (empty lists included). An
    exception from the callback is kept and raised by generate() once the program has finished
    (raising inside a host callback would abort the device program with an opaque error).
    """

    def __init__(self, callback: Callable[[list[list[int]]], None], num_rows: int,
                 eos_ids: tuple[int, ...]):
        self.callback = callback
        self.eos_ids = eos_ids
        self.sent = [0] * num_rows
        self.ended = [False] * num_rows
        self.error: BaseException | None = None

    def __call__(self, tokens: np.ndarray, num_tokens: np.ndarray) -> None:
        if self.error is not None:
            return
        try:
            new = []
            for b, count in enumerate(num_tokens.tolist()):
                chunk = [] if self.ended[b] else tokens[b, self.sent[b]:count].tolist()
                self.sent[b] = max(self.sent[b], count)
                kept = _truncate_after_eos(chunk, self.eos_ids)
                self.ended[b] |= bool(kept) and kept[-1] in self.eos_ids
                new.append(kept)
            self.callback(new)
        except BaseException as e:  # KeyboardInterrupt too: re-raised after the program
            self.error = e


def generate(model: NLDModel, prompts: Any, mode: str = DEFAULT_MODE, max_new_tokens: int = 256,
             temperature: float = 0.0, block_size: int | None = None,
             threshold: float | None = 0.9, seed: int = 0, *, top_k: int = 0,
             top_p: float = 1.0, max_cache_len: int | None = None,
             denoise_steps: int | None = None, all_mask_init: bool = False,
             accept_rule: str = "exact",
             eos_token_ids: Sequence[int] | None = None,
             stream: Callable[[list[list[int]]], None] | None = None,
             images: Sequence[Sequence[np.ndarray]] | None = None,
             prefill_chunk: int = 512) -> GenerationOutput:
    """Generates continuations of a ragged batch of prompts.

    Args:
      model: the network.
      prompts: a list of token-id lists (ragged) or an int array [B, T]; or a list of strings
        when the model has a tokenizer (`model.tokenizer`, attached by load_model).
      mode: "ar" | "diffusion" | "self_spec" | "self_spec_quadratic".
      max_new_tokens: the budget per prompt.
      temperature: 0 = greedy.
      block_size: diffusion/self-spec block (default config.block_size), at most 256 (32 for
        quadratic self-spec, which runs T*(T+1) tokens a forward and needs that many cache
        slots of room).
      threshold: diffusion commit threshold in (0, 1]; None = even top-k schedule.
      seed: PRNG seed for sampling, in [0, 2**32).
      top_k: sample among the k most likely tokens (0 = off).
      top_p: sample among the smallest set reaching this probability (1.0 = off).
      max_cache_len: the context the KV cache is sized for (default: buckets of the request,
        up to config.max_position_embeddings).
      denoise_steps: diffusion: at most this many denoise forwards a block (default
        block_size); with threshold=None the even schedule spreads the masks over them.
      all_mask_init: diffusion: start blocks all-mask (SGLang/vLLM) instead of [pending, MASK...].
      accept_rule: self-spec (both kinds) at temperature > 0: "exact" speculative sampling (the
        output is distributed as AR sampling) or "match" (NVIDIA's: sample the AR token, accept
        on match).
      eos_token_ids: tokens that end a row (default: config.eos_token_ids).
      stream: called as stream(new_tokens) from inside the running program, with one list per
        row of the tokens committed since the last call (cut after EOS as in the output): once
        when the decode loop starts (the prefill's token in AR and self_spec), then after every
        token (AR), block (diffusion) or cycle (self-spec). Streaming compiles its own program,
        which holds an ordered host callback; without it the program has none.
      images: a VLM's images: per prompt, a list of its images in prompt order (float32
        [3, H, W] from nld_jax.load_image; [] for a prompt without), each standing in the prompt
        as its span of <|image_start|>, <|image_pad|> rows and <|image_end|> (see
        nld_jax.vision.chat_prompt). They are encoded first (one program per image-size
        bucket), then the prefill writes the image positions into the cache once.
      prefill_chunk: prompts longer than this many tokens go through the cached forward in
        chunks of it, so the prefill's activations grow as chunk x cache length, not as the
        prompt length squared (the Pallas attention kernel serves each chunk on Hopper).
    Returns:
      GenerationOutput.
    Raises:
      ValueError or TypeError naming the argument at fault; nld_jax.limits.ResourceLimitError
      (a ValueError) for a block larger than its mode's largest, or a call whose KV cache plus
      biggest activation exceeds the device's free memory (checked before compiling).
    """
    config = model.config
    if not isinstance(mode, str) or mode not in REGISTRY:
        raise ValueError(f"unknown {mode=}; expected one of {MODES}")
    decode_mode = REGISTRY[mode]
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    temperature = checks.real("temperature", temperature, low=0.0)
    top_p = checks.real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    top_k = checks.integer("top_k", top_k, low=0, high=config.vocab_size)
    # jax.random.key keeps 32 bits: wider seeds would silently repeat other seeds' streams.
    seed = checks.integer("seed", seed, low=0, high=2**32, high_open=True)
    if max_cache_len is not None:
        max_cache_len = checks.integer("max_cache_len", max_cache_len, low=1,
                                       high=config.max_position_embeddings)
    settings = decode_mode.settings.from_options(config, Options(
        block_size=block_size, threshold=threshold, denoise_steps=denoise_steps,
        all_mask_init=all_mask_init, accept_rule=accept_rule))
    eos_ids = _eos_ids(config, eos_token_ids)
    prefill_chunk = checks.integer("prefill_chunk", prefill_chunk, low=1)
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a callable or None, got {type(stream).__name__}")
    tokenizer = getattr(model, "tokenizer", None)
    rows = _as_rows(_encode_strings(prompts, tokenizer), config.vocab_size)
    limit = config.max_position_embeddings if max_cache_len is None else max_cache_len
    prompt_bucket, out_len, capacity = _sizes(settings.room(), max(len(r) for r in rows),
                                              int(max_new_tokens), max_cache_len, limit,
                                              prefill_chunk)
    layout: Layout | None = getattr(model, "layout", None)
    kernels = Kernels.choose(model.attention_impl, config=config, dtype=model.dtype,
                             capacity=capacity, block_size=settings.step_block,
                             layout=layout, batch=len(rows))
    # Before compiling anything: would the cache and the biggest activation fit?
    step_tokens = max(1, settings.room().write_ahead)
    limits.check_memory(limits.estimate_memory(
        config, model.dtype, batch=len(rows), capacity=capacity,
        forwards={"prefill": (min(prompt_bucket, prefill_chunk), not kernels.attention),
                  "decode step": (step_tokens, not kernels.attention)}, layout=layout),
        limits.available_memory() if layout is None else limits.available_memory(
            layout.mesh.local_devices[0], host_sharers=len(layout.mesh.local_devices)))
    padded = np.zeros((len(rows), prompt_bucket), np.int32)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    lengths = np.array([len(r) for r in rows], np.int32)
    spliced = prepare_images(model.vision, config, padded, images)

    graphdef, state = nnx.split(model)
    static = _Static(mode=decode_mode, capacity=capacity, out_len=out_len, top_k=top_k,
                     kernels=kernels, prefill_chunk=prefill_chunk, layout=layout)
    handler = None if stream is None else _StreamHandler(stream, len(rows), eos_ids)
    stream_id = None if handler is None else register_stream(handler)
    try:
        final = jax.device_get(_program(
            graphdef, state, settings, jnp.asarray(padded), jnp.asarray(lengths),
            jnp.int32(max_new_tokens), jax.random.key(seed), jnp.float32(temperature),
            jnp.float32(top_p), jnp.asarray(_pad_ids(eos_ids), jnp.int32),
            None if stream_id is None else Stream(stream_id=jnp.int32(stream_id)), spliced,
            static=static))
    finally:
        if stream_id is not None:
            unregister_stream(stream_id)
    if handler is not None and handler.error is not None:
        raise handler.error
    out_tokens = [_truncate_after_eos(final.tokens[b, :final.num_tokens[b]].tolist(), eos_ids)
                  for b in range(len(rows))]
    num_forwards = int(final.num_forwards)
    total = sum(len(t) for t in out_tokens)
    row_forwards = int(final.row_forwards.sum())
    # Per row, as at batch size 1: tokens over the forwards each row took part in (the prefill's
    # token included, the prefill not counted).
    stats: dict[str, Any] = {"num_forwards": num_forwards, "num_tokens": total,
                             "row_forwards": row_forwards,
                             "tokens_per_forward": total / max(row_forwards, 1),
                             **decode_mode.stats(final)}
    texts = None if tokenizer is None else [tokenizer.decode(t) for t in out_tokens]
    return GenerationOutput(tokens=out_tokens, num_forwards=num_forwards, stats=stats,
                            texts=texts)
