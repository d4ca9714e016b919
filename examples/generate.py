"""Generate with an NLD checkpoint: `python examples/generate.py [--model DIR] [--mode ar]`.

Without --model it runs the small checkpoint bundled with the tests, on CPU, and prints the
prompt and generated token ids with the forward count and wall time.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import nld_jax
from nld_jax.generate import MODES

BUNDLED = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / \
    "gqa4_theta1e6"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED), help="checkpoint directory")
    parser.add_argument("--mode", default="ar", choices=MODES)
    parser.add_argument("--prompt", default="1,17,42,5,99", help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model = nld_jax.load_model(args.model, dtype=args.dtype)
    prompt = [int(t) for t in args.prompt.split(",")]
    start = time.perf_counter()
    out = nld_jax.generate(model, [prompt], mode=args.mode, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature)
    seconds = time.perf_counter() - start
    print(f"model:   {args.model}")
    print(f"prompt:  {prompt}")
    print(f"{args.mode}: {out.tokens[0]}")
    print(f"{len(out.tokens[0])} tokens, {out.num_forwards} forwards after the prefill, "
          f"{seconds:.2f} s (compile included)")


if __name__ == "__main__":
    main()
