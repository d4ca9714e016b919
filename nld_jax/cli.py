"""nld-generate: generate from a checkpoint directory, printing the text as it is committed.

    nld-generate MODEL "prompt" --mode self_spec [--chat] [--max-new-tokens N] [--temperature T]
                 [--top-k K] [--top-p P] [--accept-rule exact|match] [--block-size B]
                 [--threshold X] [--image PATH ...] [--compile-cache DIR | --no-compile-cache]

The text goes to stdout as the program commits it (per token in AR, per block or cycle in the
block modes: generate(stream=...) calls back from inside the one compiled program); a summary
line with tokens/s and tokens per forward goes to stderr. Bad input gets one line on stderr
and exit status 2; Ctrl-C one line "nld-generate: interrupted" and status 130.

Compiled programs are kept in jax's persistent compilation cache, so a later run with the same
shapes starts without compiling (an 8B generate program takes 25-40 s to compile for an H100):
in --compile-cache DIR, else $JAX_COMPILATION_CACHE_DIR (jax's own variable; empty: no cache),
else ~/.cache/nld_jax/xla ($XDG_CACHE_HOME honoured). --no-compile-cache compiles afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import jax

import nld_jax
from nld_jax.generate import GenerationOutput
from nld_jax.tokenizer import Tokenizer

__all__ = ["main", "stream_text", "StreamResult", "OneLineParser", "UsageError",
           "exit_on_interrupt", "add_compile_cache_flags", "use_compile_cache"]

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


class UsageError(Exception):
    """Bad command-line input: reported in one line with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


class _TextPrinter:
    """Writes row 0's text as tokens arrive: decodes every token so far, writes the new suffix.

    Decoding the whole prefix (not each token alone) keeps multi-token characters and
    tokenizer spacing right; text ending in U+FFFD (half a UTF-8 character) waits for more.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO):
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = ""
        self.first_time: float | None = None
        self.first_count = 0

    def __call__(self, new_tokens: list[list[int]]) -> None:
        if self.first_time is None:  # the decode loop has started
            self.first_time, self.first_count = time.perf_counter(), len(new_tokens[0])
        self.ids += new_tokens[0]
        self.show(self.tokenizer.decode(self.ids))

    def show(self, text: str) -> None:
        if text == self.printed or text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def _interrupted(prog: str) -> int:
    sys.stdout.flush()
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return INTERRUPTED_STATUS


@contextlib.contextmanager
def _exit_at_once_on_sigint(prog: str) -> Iterator[None]:
    """While active, SIGINT ends the process at once with one line and status 130.

    A compiled program runs with the main thread inside C++, where Python cannot raise
    KeyboardInterrupt until the program ends (a long generation would ignore Ctrl-C). The
    signal module writes every signal to a wakeup file descriptor from C at once: a thread
    waiting on it exits the process. Only for work that leaves nothing to clean up.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread: nothing to watch
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:  # the write end closed: the block is over
                return
            if signal.SIGINT in data:
                sys.stdout.write("\n")  # ends the text streamed so far
                _interrupted(prog)
                os._exit(INTERRUPTED_STATUS)

    watcher = threading.Thread(target=watch, name=f"{prog}-sigint", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)
        watcher.join()
        os.close(read_fd)


def exit_on_interrupt(prog: str, *, at_once: bool = False
                      ) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates a command's main(): Ctrl-C prints "PROG: interrupted" and returns 130.

    Args:
      prog: the command's name, for the message.
      at_once: also stop immediately while a compiled program runs (see
        _exit_at_once_on_sigint); only for commands with nothing to clean up. Otherwise the
        KeyboardInterrupt unwinds first, so `with` blocks remove what they were writing.
    """

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: object, **kwargs: object) -> int:
            try:
                if not at_once:
                    return main(*args, **kwargs)
                with _exit_at_once_on_sigint(prog):
                    return main(*args, **kwargs)
            except KeyboardInterrupt:
                return _interrupted(prog)

        return run

    return decorate


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """What stream_text() returns."""

    output: GenerationOutput
    text: str  # the decoded new tokens
    seconds: float  # the whole call, compile included
    first_seconds: float  # until the decode loop started (compile and prefill included)
    tokens_per_second: float  # tokens the decode loop committed / its time (no compile)

    def summary(self) -> str:
        """One line: tokens, forwards, tokens/forward, tokens/s."""
        stats = self.output.stats
        return (f"{stats['num_tokens']} tokens, {self.output.num_forwards} forwards: "
                f"{stats['tokens_per_forward']:.2f} tokens/forward, "
                f"{self.tokens_per_second:.1f} tokens/s decoding ({self.first_seconds:.2f} s "
                f"to start: compile + prefill; {self.seconds:.2f} s total)")


def stream_text(model: nld_jax.NLDModel, tokenizer: Tokenizer, prompt: Sequence[int],
                out: TextIO, **generate_kwargs: Any) -> StreamResult:
    """Generates from one prompt, writing the text to `out` as it is committed.

    Args:
      model: the network.
      tokenizer: decodes the streamed tokens.
      prompt: token ids.
      out: where the text goes (flushed after every piece).
      generate_kwargs: passed to nld_jax.generate (mode, max_new_tokens, ...).
    """
    printer = _TextPrinter(tokenizer, out)
    start = time.perf_counter()
    output = nld_jax.generate(model, [list(prompt)], stream=printer, **generate_kwargs)
    end = time.perf_counter()
    text = tokenizer.decode(output.tokens[0])
    printer.show(text)
    if printer.printed != text:  # a decoder whose text is not prefix-stable: show it whole
        out.write("\n" + text)
    # The first callback comes when the decode loop starts, after compile and prefill.
    first = printer.first_time if printer.first_time is not None else start
    decoded = len(output.tokens[0]) - printer.first_count
    rate = decoded / (end - first) if end > first else 0.0
    return StreamResult(output=output, text=text, seconds=end - start,
                        first_seconds=first - start, tokens_per_second=rate)


COMPILE_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # jax's own: it reads it at import as well


def add_compile_cache_flags(parser: argparse.ArgumentParser) -> None:
    """--compile-cache DIR and --no-compile-cache (see the module docstring)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile-cache", metavar="DIR", default=None,
                       help="keep compiled programs in DIR for later runs (default: "
                            f"${COMPILE_CACHE_ENV} if set, else ~/.cache/nld_jax/xla)")
    group.add_argument("--no-compile-cache", action="store_true",
                       help="compile every program afresh")


def use_compile_cache(args: argparse.Namespace) -> str | None:
    """Points jax's persistent compilation cache where the flags say, before anything is
    compiled; returns the directory (None: no cache)."""
    if args.no_compile_cache:
        directory = None
    elif args.compile_cache is not None:
        directory = args.compile_cache
    elif COMPILE_CACHE_ENV in os.environ:
        directory = os.environ[COMPILE_CACHE_ENV] or None
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        directory = os.path.join(base, "nld_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="nld-generate",
                           description="Generate with an NLD checkpoint, streaming the text.")
    parser.add_argument("model", help="checkpoint directory (Hugging Face layout or nld-convert "
                                      "Orbax output) with tokenizer files, or a Hub repo id")
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--mode", default="self_spec", choices=nld_jax.MODES)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as one user turn with the chat template")
    parser.add_argument("--thinking", action="store_true",
                        help="with --chat: enable_thinking=True")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=None,
                        help="diffusion/self_spec block (default: the config's)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="diffusion commit threshold")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the smallest set reaching this probability (1: off)")
    parser.add_argument("--accept-rule", default="exact", choices=("exact", "match"),
                        help="self-spec at temperature > 0: exact speculative sampling or "
                             "sample-and-match")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="a VLM checkpoint: an image placed before the prompt text "
                             "(repeatable; in the user turn with --chat)")
    add_compile_cache_flags(parser)
    return parser


def _image_prompt(model: nld_jax.NLDModel, tokenizer: Tokenizer, args: argparse.Namespace
                  ) -> tuple[list[int], list[Any]]:
    """The prompt with --image files before the text: (ids, images)."""
    from nld_jax.image import image_token_ids
    from nld_jax.vision import chat_prompt

    mm = model.config.multimodal
    if mm is None:
        raise UsageError(f"--image needs a VLM checkpoint; {args.model} has no vision_config")
    content = [{"type": "image", "image": path} for path in args.image]
    if args.chat:
        return chat_prompt(tokenizer, [{"role": "user", "content": content + [
            {"type": "text", "text": args.prompt}]}], mm, enable_thinking=args.thinking)
    images = [nld_jax.load_image(path, max_image_size=mm.max_image_size,
                                 background=mm.image_background) for path in args.image]
    text = tokenizer.encode(args.prompt)
    bos = text[:1] if text[:1] == [tokenizer.bos_token_id] else []
    prompt = list(bos)
    for image in images:
        prompt += image_token_ids(image.shape[1] // mm.token_pixels,
                                  image.shape[2] // mm.token_pixels,
                                  start_id=mm.image_start_token_id, pad_id=mm.image_token_id,
                                  break_id=mm.image_break_token_id, end_id=mm.image_end_token_id)
    return prompt + text[len(bos):], images


@exit_on_interrupt("nld-generate", at_once=True)
def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """The nld-generate command; returns the exit status (2 on bad input, 130 on Ctrl-C)."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        args = _parser().parse_args(argv)
        use_compile_cache(args)
        model = nld_jax.load_model(args.model, dtype=args.dtype)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise UsageError(f"{args.model}: no tokenizer.json, so text cannot be encoded")
        images = None
        if args.image:
            prompt, images = _image_prompt(model, tokenizer, args)
        elif args.chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                   enable_thinking=args.thinking)
        else:
            prompt = tokenizer.encode(args.prompt)
        result = stream_text(model, tokenizer, prompt, stdout, mode=args.mode,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             block_size=args.block_size, threshold=args.threshold,
                             top_k=args.top_k, top_p=args.top_p, accept_rule=args.accept_rule,
                             seed=args.seed, images=None if images is None else [images])
    except (UsageError, ValueError, OSError) as e:  # LoadError and TokenizerError included
        message = " ".join(str(e).split())  # one line, whatever the exception holds
        print(f"nld-generate: error: {message}", file=stderr)
        return 2
    stdout.write("\n")
    stdout.flush()
    print(result.summary(), file=stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
