"""Load time: the released safetensors layout against its nld-convert Orbax copy.

    python examples/load_speed.py                    # a random ~100M-parameter model
    python examples/load_speed.py --layers 16 --hidden 1024 --repeats 5

Builds a random model (the "tiny" preset scaled up with dataclasses.replace, LoRA adapter
attached), saves it in the released layout (bf16 safetensors) in a temporary directory,
converts that with nld-convert, then times nld_jax.load_model on both (every array ready on
the device) and prints a table. The first load of each is a warm-up (page cache), not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

import nld_jax
from convert.hf_to_orbax import convert
from nld_jax.loading import save_model


def _directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _time_load(path: str, dtype: str, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model = nld_jax.load_model(path, dtype=dtype)
        jax.block_until_ready(nnx.state(model))
        if i > 0:  # the first is the warm-up
            times.append(time.perf_counter() - start)
        del model
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = dataclasses.replace(
        nld_jax.NLDConfig.preset("tiny"), vocab_size=args.vocab, hidden_size=args.hidden,
        num_hidden_layers=args.layers, intermediate_size=args.intermediate,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64)
    model = nld_jax.NLDModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.attach_lora(16, 2.0, rngs=nnx.Rngs(1))
    print(f"random model: {config.num_parameters / 1e6:.1f}M parameters, {args.layers} layers, "
          f"hidden {args.hidden}; {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, orbax_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "orbax")
        save_model(model, hf_dir, dtype="bfloat16")
        del model
        start = time.perf_counter()
        convert(hf_dir, orbax_dir, dtype="bfloat16", progress=False)
        print(f"nld-convert: {time.perf_counter() - start:.2f} s")
        print(f"\n{'format':12s} {'dtype':9s} {'size MB':>8s} {'median s':>9s} {'min s':>7s} "
              f"{'MB/s':>7s}")
        for dtype in ("bfloat16", "float32"):
            for name, path in (("safetensors", hf_dir), ("orbax", orbax_dir)):
                times = _time_load(path, dtype, args.repeats)
                size = _directory_bytes(path) / 2**20
                median = statistics.median(times)
                print(f"{name:12s} {dtype:9s} {size:8.1f} {median:9.3f} {min(times):7.3f} "
                      f"{size / median:7.0f}")


if __name__ == "__main__":
    main()
