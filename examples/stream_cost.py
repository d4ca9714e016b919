"""What streaming costs: generate() with and without a host callback, per mode.

    python examples/stream_cost.py                      # the bundled tiny model
    python examples/stream_cost.py --model DIR --max-new-tokens 256 --batch 4

Streaming compiles a second program whose decode loop calls back to the host (an ordered
io_callback carrying the output buffer) once per token (AR), block (diffusion) or cycle
(self_spec). Both programs are compiled first; then each is timed `--repeats` times and the
medians are compared. EOS is set to an id the prompt never leads to (`--eos`), so every run
decodes the whole budget and both variants do the same work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import nld_jax
from nld_jax import tiny


def _ignore(new_tokens: list[list[int]]) -> None:
    """A stream callback that does nothing: what remains is the cost of the callback itself."""


def _median_seconds(model: nld_jax.NLDModel, prompts: list, repeats: int,
                    **kwargs) -> float:
    """Median wall time of generate(model, prompts, **kwargs), after a compiling call."""
    nld_jax.generate(model, prompts, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        nld_jax.generate(model, prompts, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(tiny.TINY_MODEL_DIR))
    parser.add_argument("--prompt", default="<s> sort 3 9 1 4 7 2 8 =")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--eos", type=int, default=0, help="stop id (default: <pad> of tiny)")
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    args = parser.parse_args()

    model = nld_jax.load_model(args.model, dtype=args.dtype)
    # A checkpoint without a tokenizer (e.g. a random one from load_speed.py) gets token ids.
    prompt = args.prompt if hasattr(model, "tokenizer") else [1, 4, 8, 9, 6, 5, 7]
    prompts = [prompt] * args.batch
    print(f"model {args.model} ({model.config.num_parameters / 1e6:.1f}M parameters), batch "
          f"{args.batch}, {args.max_new_tokens} new tokens, median of {args.repeats}")
    print(f"{'mode':19s} {'callbacks':>9s} {'plain ms':>9s} {'stream ms':>10s} {'cost':>7s} "
          f"{'us/callback':>12s}")
    for mode in nld_jax.MODES:
        kwargs = dict(mode=mode, max_new_tokens=args.max_new_tokens, eos_token_ids=[args.eos])
        calls: list[list[list[int]]] = []
        nld_jax.generate(model, prompts, stream=calls.append, **kwargs)
        plain = _median_seconds(model, prompts, args.repeats, **kwargs)
        streamed = _median_seconds(model, prompts, args.repeats, stream=_ignore, **kwargs)
        cost = (streamed - plain) / plain
        per_call = (streamed - plain) / len(calls) * 1e6
        print(f"{mode:19s} {len(calls):9d} {plain * 1e3:9.1f} {streamed * 1e3:10.1f} "
              f"{cost:+7.1%} {per_call:12.0f}")


if __name__ == "__main__":
    main()
