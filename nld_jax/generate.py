"""generate(): validate, bucket, prefill and run one decoding mode as one XLA program."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nld_jax.cache import KVCache
from nld_jax.decode import ar, diffusion, self_spec, self_spec_quadratic
from nld_jax.decode.common import Budget, Sampler, Stream, register_stream, unregister_stream
from nld_jax.decode.prefill import prefill
from nld_jax.model import NLDModel
from nld_jax.step_kernels import use_step_kernels

__all__ = ["generate", "GenerationOutput", "MODES", "TRACE_COUNTS"]

MODES = ("ar", "diffusion", "self_spec", "self_spec_quadratic")
_SPECULATIVE = ("self_spec", "self_spec_quadratic")
_MIN_BUCKET = 16

# How often each mode's program has been traced; tests read it to prove there is no recompile.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What generate() returns."""

    tokens: list[list[int]]  # new tokens of each prompt, up to and including the first EOS
    num_forwards: int  # network forwards after the prefill, for the whole batch
    stats: dict[str, Any]  # per-mode figures
    texts: list[str] | None = None  # the tokens decoded, when the model has a tokenizer


def _bucket(n: int) -> int:
    """The next power of two >= n (at least _MIN_BUCKET): lengths in one bucket share a program."""
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


def _as_rows(prompts: Any, vocab_size: int) -> list[np.ndarray]:
    """Validates prompts and returns them as int32 rows."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(f"prompts array must be [B, T], got shape {array.shape}")
        rows = list(array)
    elif isinstance(prompts, Sequence):
        rows = [np.asarray(p) for p in prompts]
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
        if not np.issubdtype(row.dtype, np.integer):
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

    mode: str
    capacity: int  # S: cache slots
    out_len: int  # O: output buffer per row
    top_k: int
    block_size: int
    use_threshold: bool
    all_mask_init: bool
    accept_rule: str


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _program(graphdef: nnx.GraphDef, state: nnx.State, prompts: jax.Array,
             prompt_lengths: jax.Array, max_new_tokens: jax.Array, rng: jax.Array,
             temperature: jax.Array, top_p: jax.Array, threshold: jax.Array,
             denoise_steps: jax.Array, eos_ids: jax.Array, stream: Stream | None, *,
             static: _Static) -> dict[str, jax.Array]:
    """Prefill and the whole decode loop of one mode, as one program.

    `stream` is None (no host callback in the program) or a Stream: None and a Stream are
    different pytree structures, so each gets its own compiled program.
    """
    TRACE_COUNTS[static.mode] += 1
    model: NLDModel = nnx.merge(graphdef, state)
    config = model.config
    cache = KVCache.empty(num_layers=config.num_hidden_layers, batch=prompts.shape[0],
                          capacity=static.capacity, num_kv_heads=config.num_key_value_heads,
                          head_dim=config.head_dim, dtype=model.dtype)
    sampler = Sampler(temperature=temperature, top_p=top_p, top_k=static.top_k)
    budget = Budget(max_new_tokens=max_new_tokens, eos_ids=eos_ids)
    prefill_rng, loop_rng = jax.random.split(rng)
    last_logits, cache = prefill(model, prompts, prompt_lengths, cache)
    seed = sampler(last_logits, prefill_rng)
    if static.mode == "ar":
        final = ar.run(model, sampler, budget, ar.init(cache, seed, static.out_len, budget,
                                                        loop_rng), stream)
        extra = {}
    elif static.mode == "diffusion":
        settings = diffusion.Settings(
            threshold=threshold, denoise_steps=denoise_steps,
            mask_token_id=config.mask_token_id, block_size=static.block_size,
            use_threshold=static.use_threshold, all_mask_init=static.all_mask_init,
            step_kernels=use_step_kernels(model.attention_impl, config.vocab_size,
                                          static.block_size))
        final = diffusion.run(model, sampler, budget, settings,
                              diffusion.init(cache, seed, static.out_len, budget, loop_rng),
                              stream)
        extra = dict(num_blocks=final.num_blocks, denoise_steps=final.denoise_steps)
    else:
        settings = self_spec.Settings(mask_token_id=config.mask_token_id,
                                      block_size=static.block_size,
                                      accept_rule=static.accept_rule,
                                      step_kernels=use_step_kernels(
                                          model.attention_impl, config.vocab_size,
                                          static.block_size))
        if static.mode == "self_spec":
            final = self_spec.run(model, sampler, budget, settings,
                                  self_spec.init(cache, seed, static.out_len, budget, loop_rng,
                                                 settings), stream)
        else:
            final = self_spec_quadratic.run(
                model, sampler, budget, settings,
                self_spec_quadratic.init(model, sampler, cache, seed, static.out_len, budget,
                                         loop_rng, settings), stream).core
        extra = dict(accepted_histogram=final.accepted_histogram)
    return dict(tokens=final.tokens, num_tokens=final.num_tokens,
                num_forwards=final.num_forwards, row_forwards=final.row_forwards, **extra)


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


def generate(model: NLDModel, prompts: Any, mode: str = "ar", max_new_tokens: int = 256,
             temperature: float = 0.0, block_size: int | None = None,
             threshold: float | None = 0.9, seed: int = 0, *, top_k: int = 0,
             top_p: float = 1.0, max_cache_len: int | None = None,
             denoise_steps: int | None = None, all_mask_init: bool = False,
             accept_rule: str = "exact",
             eos_token_ids: Sequence[int] | None = None,
             stream: Callable[[list[list[int]]], None] | None = None) -> GenerationOutput:
    """Generates continuations of a ragged batch of prompts.

    Args:
      model: the network.
      prompts: a list of token-id lists (ragged) or an int array [B, T]; or a list of strings
        when the model has a tokenizer (`model.tokenizer`, attached by load_model).
      mode: "ar" | "diffusion" | "self_spec" | "self_spec_quadratic".
      max_new_tokens: the budget per prompt.
      temperature: 0 = greedy.
      block_size: diffusion/self-spec block (default config.block_size). Quadratic
        self-spec runs T*(T+1) tokens a forward and needs that many cache slots of room.
      threshold: diffusion commit threshold in (0, 1]; None = even top-k schedule.
      seed: PRNG seed for sampling.
      top_k: sample among the k most likely tokens (0 = off).
      top_p: sample among the smallest set reaching this probability (1.0 = off).
      max_cache_len: the context the KV cache is sized for (default: buckets of the request,
        up to config.max_position_embeddings).
      denoise_steps: diffusion: at most this many denoise forwards a block (default
        block_size); with threshold=None the even schedule spreads the masks over them.
      all_mask_init: diffusion: start blocks all-mask (SGLang/vLLM) instead of [seed, MASK...].
      accept_rule: self-spec (both kinds) at temperature > 0: "exact" speculative sampling (the
        output is distributed as AR sampling) or "match" (NVIDIA's: sample the AR token, accept
        on match).
      eos_token_ids: tokens that end a row (default: config.eos_token_ids).
      stream: called as stream(new_tokens) from inside the running program, with one list per
        row of the tokens committed since the last call (cut after EOS as in the output): once
        when the decode loop starts (the prefill's token in AR and self_spec), then after every
        token (AR), block (diffusion) or cycle (self-spec). Streaming compiles its own program,
        which holds an ordered host callback; without it the program has none.
    Returns:
      GenerationOutput.
    """
    config = model.config
    if mode not in MODES:
        raise ValueError(f"unknown {mode=}; expected one of {MODES}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be a positive integer")
    if not temperature >= 0:
        raise ValueError(f"{temperature=} must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"{top_p=} must be in (0, 1]")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= config.vocab_size:
        raise ValueError(f"{top_k=} must be an integer in [0, vocab_size={config.vocab_size}]")
    block = config.block_size if block_size is None else block_size
    if mode != "ar":
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2:
            raise ValueError(f"block_size={block!r} must be an integer >= 2")
    if mode == "diffusion":
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"{threshold=} must be in (0, 1], or None for the even schedule")
        steps = block if denoise_steps is None else denoise_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
                or not 1 <= steps <= block:
            raise ValueError(f"denoise_steps={steps!r} must be an integer in [1, {block=}]")
    else:
        steps = 1
    if mode == "self_spec_quadratic" and model.attention_impl == "pallas":
        raise NotImplementedError(
            "mode='self_spec_quadratic' attends with an explicit block pattern, which the Pallas "
            "attention kernel does not take; set model.attention_impl to 'auto' (kernels where "
            "they apply, XLA for that pattern) or 'xla'")
    if accept_rule not in self_spec.ACCEPT_RULES:
        raise ValueError(f"unknown {accept_rule=}; expected one of {self_spec.ACCEPT_RULES}")
    eos_ids = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if not eos_ids or any(not isinstance(t, (int, np.integer)) or not 0 <= t < config.vocab_size
                          for t in eos_ids):
        raise ValueError(f"eos_token_ids={eos_ids!r} must be token ids in "
                         f"[0, {config.vocab_size})")
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a callable or None, got {type(stream).__name__}")
    tokenizer = getattr(model, "tokenizer", None)
    rows = _as_rows(_encode_strings(prompts, tokenizer), config.vocab_size)
    longest = max(len(r) for r in rows)
    # Diffusion emits whole blocks: the budget is rounded up to a multiple of the block.
    rounded = -(-int(max_new_tokens) // block) * block if mode == "diffusion" else max_new_tokens
    needed = longest + int(rounded)
    limit = config.max_position_embeddings if max_cache_len is None else max_cache_len
    if needed > limit:
        which = "config.max_position_embeddings" if max_cache_len is None else "max_cache_len"
        raise ValueError(f"the longest prompt ({longest} tokens) plus {max_new_tokens=} needs "
                         f"{needed} positions, more than {which}={limit}")

    prompt_bucket, out_bucket = _bucket(longest), _bucket(int(max_new_tokens))
    # Block modes emit up to a block past the budget (diffusion also rounds it up) and write a
    # block's K/V past the valid length (quadratic self-spec: T*(T+1) tokens), so the buffers
    # and the cache get that much room: a write clamped at the cache's end would overwrite
    # valid slots.
    written = {"ar": 0, "self_spec_quadratic": block * (block + 1)}.get(mode, block)
    rounding = 0 if mode == "ar" else -(-out_bucket // block) * block - out_bucket
    out_len = out_bucket + rounding + (0 if mode == "ar" else block)
    capacity = prompt_bucket + out_bucket + rounding + written
    if max_cache_len is not None:
        # The prefill writes the whole padded prompt, and a block may be written past the end.
        capacity = max(max_cache_len + written, prompt_bucket)
    capacity = -(-capacity // 64) * 64  # whole 64-key tiles, as the attention kernel reads them
    padded = np.zeros((len(rows), prompt_bucket), np.int32)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    lengths = np.array([len(r) for r in rows], np.int32)

    graphdef, state = nnx.split(model)
    static = _Static(mode=mode, capacity=capacity, out_len=out_len,
                     top_k=top_k,
                     block_size=block if mode != "ar" else 0,
                     use_threshold=threshold is not None, all_mask_init=bool(all_mask_init),
                     accept_rule=accept_rule)
    handler = None if stream is None else _StreamHandler(stream, len(rows), eos_ids)
    stream_id = None if handler is None else register_stream(handler)
    try:
        result = _program(
            graphdef, state, jnp.asarray(padded), jnp.asarray(lengths),
            jnp.int32(max_new_tokens), jax.random.key(seed), jnp.float32(temperature),
            jnp.float32(top_p), jnp.float32(1.0 if threshold is None else threshold),
            jnp.int32(steps), jnp.asarray(_pad_ids(eos_ids), jnp.int32),
            None if stream_id is None else Stream(stream_id=jnp.int32(stream_id)), static=static)
        result = jax.device_get(result)
    finally:
        if stream_id is not None:
            unregister_stream(stream_id)
    if handler is not None and handler.error is not None:
        raise handler.error
    counts = result["num_tokens"]
    out_tokens = [_truncate_after_eos(result["tokens"][b, :counts[b]].tolist(),
                                      eos_ids) for b in range(len(rows))]
    num_forwards = int(result["num_forwards"])
    total = sum(len(t) for t in out_tokens)
    row_forwards = int(result["row_forwards"].sum())
    # Per row, as at batch size 1: tokens over the forwards each row took part in (the prefill's
    # token included, the prefill not counted).
    stats: dict[str, Any] = {"num_forwards": num_forwards, "num_tokens": total,
                             "row_forwards": row_forwards,
                             "tokens_per_forward": total / max(row_forwards, 1)}
    if mode == "diffusion":
        blocks = int(result["num_blocks"].sum())
        stats["num_blocks"] = blocks
        stats["denoise_steps_per_block"] = int(result["denoise_steps"].sum()) / max(blocks, 1)
    elif mode in _SPECULATIVE:
        histogram = result["accepted_histogram"]
        cycles = int(histogram.sum())
        stats["accepted_histogram"] = histogram.tolist()
        stats["cycles"] = cycles
        stats["mean_accepted"] = float((histogram * np.arange(histogram.size)).sum()
                                       / max(cycles, 1))
    texts = None if tokenizer is None else [tokenizer.decode(t) for t in out_tokens]
    return GenerationOutput(tokens=out_tokens, num_forwards=num_forwards, stats=stats,
                            texts=texts)
