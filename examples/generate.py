"""Generate with an NLD checkpoint in every decoding mode.

    python examples/generate.py                       # the bundled tiny model, every mode
    python examples/generate.py --model DIR --prompt "..." --mode self_spec

For each mode it prints the decoded text, the tokens per forward and the wall time (the first
call compiles the program; the time shown is a second, compiled call).
"""

from __future__ import annotations

import argparse
import time

import nld_jax
from nld_jax import tiny
from nld_jax.generate import MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(tiny.TINY_MODEL_DIR), help="checkpoint directory")
    parser.add_argument("--prompt", default="<s> sort 3 9 1 4 7 2 8 =")
    parser.add_argument("--mode", default="all", choices=("all",) + MODES)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model = nld_jax.load_model(args.model, dtype=args.dtype)
    tokenizer = nld_jax.load_tokenizer(args.model)
    prompt = tokenizer.encode(args.prompt)
    print(f"model  {args.model} ({model.config.num_parameters / 1e6:.1f}M parameters)")
    print(f"prompt {args.prompt!r}")
    modes = MODES if args.mode == "all" else (args.mode,)
    for mode in modes:
        kwargs = dict(mode=mode, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, block_size=args.block_size)
        start = time.perf_counter()
        nld_jax.generate(model, [prompt], **kwargs)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        out = nld_jax.generate(model, [prompt], **kwargs)
        seconds = time.perf_counter() - start
        print(f"{mode:19s} {tokenizer.decode(out.tokens[0])!r}")
        print(f"{'':19s} {len(out.tokens[0])} tokens in {out.num_forwards} forwards "
              f"({out.stats['tokens_per_forward']:.2f} tokens/forward), {seconds * 1e3:.0f} ms "
              f"(first call with compile {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
