"""Chat with an NLD instruct checkpoint: a multi-turn loop over its chat template.

    python examples/chat.py --model DIR [--mode self_spec] [--thinking] [--max-new-tokens N]
    printf 'What is 3+4?\\nAnd times 2?\\n' | python examples/chat.py --model DIR

Reads one user message per line from stdin (a terminal or a pipe), streams each answer to
stdout as it is committed, and keeps the conversation for the next turn. `/reset` starts a new
conversation; `/exit` or end of input quits. Per-turn figures (tokens/s, tokens per forward)
go to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import nld_jax
from nld_jax.cli import (
    OneLineParser,
    UsageError,
    add_compile_cache_flags,
    exit_on_interrupt,
    stream_text,
    use_compile_cache,
)


@exit_on_interrupt("chat.py", at_once=True)
def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory with a tokenizer "
                                                       "and chat template")
    parser.add_argument("--mode", default="self_spec", choices=("ar", "diffusion", "self_spec"))
    parser.add_argument("--thinking", action="store_true", help="enable_thinking=True")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    add_compile_cache_flags(parser)
    try:
        args = parser.parse_args(argv)
        use_compile_cache(args)
        model = nld_jax.load_model(args.model, dtype=args.dtype)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or tokenizer.chat_template is None:
            raise UsageError(f"{args.model}: needs tokenizer.json and a chat template")
    except (UsageError, ValueError, OSError) as e:
        print(f"chat.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    start = [] if args.system is None else [{"role": "system", "content": args.system}]
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, enable_thinking=args.thinking)
        result = stream_text(model, tokenizer, prompt, sys.stdout, mode=args.mode,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"[{result.summary()}]", file=sys.stderr)
        # The template drops any reasoning from earlier answers itself.
        messages.append({"role": "assistant", "content": result.text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
