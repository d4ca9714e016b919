"""Decode speed of every mode on the default backend at a mid-size random shape.

    python benchmarks/decode_speed.py --layers 8 --width 512 --repeats 3

Random weights decode nothing meaningful (self-spec accepts few drafts), so ms per forward is the
figure to compare between commits; tokens/s is reported too. The random weights are written once
to --checkpoint in the released layout and loaded from there, so that two commits decode the same
tokens with the same forwards. Each mode is compiled by a first call, then timed over --repeats
calls (median).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

import nld_jax
from nld_jax.loading import save_model
from nld_jax.model import NLDModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+",
                        default=["ar", "diffusion", "self_spec", "self_spec_quadratic"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-loop", default="auto", help="NLDModel.layer_loop")
    parser.add_argument("--checkpoint", default="/tmp/nld_decode_speed_model",
                        help="where the random weights are kept (written on first use)")
    args = parser.parse_args()
    config = dataclasses.replace(
        nld_jax.NLDConfig.preset("tiny"), vocab_size=args.vocab, hidden_size=args.width,
        head_dim=64, num_attention_heads=args.width // 64, num_key_value_heads=2,
        intermediate_size=3 * args.width, num_hidden_layers=args.layers,
        mask_token_id=args.vocab - 1, block_size=args.block)
    if not os.path.isdir(args.checkpoint):
        model = NLDModel(config, dtype="float32", rngs=nnx.Rngs(0))
        model.attach_lora(8, 1.0, rngs=nnx.Rngs(1))
        save_model(model, args.checkpoint)
    model = nld_jax.load_model(args.checkpoint, dtype="bfloat16")
    model.layer_loop = args.layer_loop
    shape = ("num_hidden_layers", "hidden_size", "vocab_size", "block_size")
    if any(getattr(model.config, f) != getattr(config, f) for f in shape):
        raise SystemExit(f"{args.checkpoint} holds another shape; pass a new --checkpoint")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, args.vocab - 1, (args.batch, args.prompt)).tolist()
    # No EOS: every row runs its whole budget, so the work per call is fixed.
    kwargs = dict(max_new_tokens=args.new, eos_token_ids=[args.vocab - 1])
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {args.layers} layers, "
          f"D={args.width}, V={args.vocab}, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new, block {args.block}, bf16, layer_loop {args.layer_loop}")
    print("| mode | compile+run s | s/call | tokens/s | forwards | ms/forward |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        start = time.perf_counter()
        out = nld_jax.generate(model, prompts, mode=mode, **kwargs)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = nld_jax.generate(model, prompts, mode=mode, **kwargs)
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        tokens = sum(len(t) for t in out.tokens)
        print(f"| {mode} | {first:.1f} | {seconds:.2f} | {tokens / seconds:.0f} | "
              f"{out.num_forwards} | {1000 * seconds / max(out.num_forwards, 1):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
