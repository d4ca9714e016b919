"""nld-generate: generate from a checkpoint directory, printing the text as it is committed.

    nld-generate MODEL "prompt" --mode self_spec [--chat] [--max-new-tokens N] [--temperature T]
                 [--block-size B] [--threshold X]

The text goes to stdout as the program commits it (per token in AR, per block or cycle in the
block modes: generate(stream=...) calls back from inside the one compiled program); a summary
line with tokens/s and tokens per forward goes to stderr. Bad input gets one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import nld_jax
from nld_jax.generate import GenerationOutput
from nld_jax.tokenizer import Tokenizer

__all__ = ["main", "stream_text", "StreamResult", "OneLineParser", "UsageError"]

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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """The nld-generate command; returns the exit status."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        args = _parser().parse_args(argv)
        model = nld_jax.load_model(args.model, dtype=args.dtype)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise UsageError(f"{args.model}: no tokenizer.json, so text cannot be encoded")
        if args.chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                   enable_thinking=args.thinking)
        else:
            prompt = tokenizer.encode(args.prompt)
        result = stream_text(model, tokenizer, prompt, stdout, mode=args.mode,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             block_size=args.block_size, threshold=args.threshold,
                             seed=args.seed)
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
