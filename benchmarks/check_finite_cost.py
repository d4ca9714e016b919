"""What load_model's NaN/Inf check (check_finite, on by default) costs on CPU at ~0.5B bf16.

Builds a randomly initialised ~0.5B-parameter network, saves it in the released safetensors
layout (bf16, about 1 GB) and times load_model with the check on and off, alternating, several
times; prints the median of each and the difference:

    python benchmarks/check_finite_cost.py [--repeats 3] [--dir /tmp/nld_finite]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax.numpy as jnp
from flax import nnx

import nld_jax
from nld_jax.loading import save_model
from nld_jax.model import NLDModel

# ~0.5B parameters: 24 layers of width 1024 (GQA 16/8 heads of 64, SwiGLU 4096), 64k vocab.
CONFIG = nld_jax.NLDConfig(vocab_size=64000, hidden_size=1024, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                           intermediate_size=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (temporary)")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="nld_finite_")
    path = os.path.join(root, "model")
    try:
        if not os.path.isdir(path):
            model = NLDModel(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            save_model(model, path, dtype="bfloat16")
            del model
        print(f"{CONFIG.num_parameters / 1e9:.2f}B parameters, "
              f"{os.path.getsize(os.path.join(path, 'model.safetensors')) / 1e9:.2f} GB bf16, "
              f"{os.cpu_count()} CPUs")
        times: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(args.repeats):
            for check in (True, False)[::1 if repeat % 2 else -1]:  # alternate the order
                start = time.perf_counter()
                model = nld_jax.load_model(path, dtype="bfloat16", check_finite=check)
                times[check].append(time.perf_counter() - start)
                del model
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"load_model check_finite=True {on:.2f} s, False {off:.2f} s (medians of "
              f"{args.repeats}): the check costs {on - off:.2f} s")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
