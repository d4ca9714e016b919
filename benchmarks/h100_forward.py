"""Bytes per decode forward of the H100-compiled program, layers scanned vs unrolled (no GPU).

    python benchmarks/h100_forward.py --size 8B --cache 2048

Compiles one AR decode forward (T=1 against a cache of --cache valid slots, the attention
kernel on, the head on the one row) for an H100 with nld_jax.aot, for layer_loop "scan" and
"unroll", and reports XLA's byte count of the optimised HLO per forward. XLA's cost analysis
counts a while body once, so the scanned program's per-layer bytes are recovered from 1- and
2-layer compiles of both loops:
    layer  = unroll(2) - unroll(1)        one layer unrolled
    body   = scan(2) - (unroll(1) - layer) the scan body (one layer, counted once)
and the L-layer figure is outside + L * per-layer for each. The kernel's own traffic (the same
for both) is left out. A model of the GPU run, not a timing.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import nld_jax
from nld_jax import aot
from nld_jax.cache import KVCache
from nld_jax.model import NLDModel


def forward_bytes(config: nld_jax.NLDConfig, layer_loop: str, cache_slots: int,
                  mesh: jax.sharding.Mesh) -> tuple[float, float]:
    """(XLA bytes accessed, compile s) of one decode forward for the target of `mesh`."""
    model = nnx.eval_shape(lambda: NLDModel(config, dtype="bfloat16", rngs=nnx.Rngs(0)))
    model.layer_loop = layer_loop
    graphdef, state = nnx.split(model)
    capacity = -(-(cache_slots + 64) // 64) * 64
    cache = jax.eval_shape(lambda: KVCache.empty(
        num_layers=config.num_hidden_layers, batch=1, capacity=capacity,
        num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        dtype=jnp.bfloat16).with_lengths(jnp.array([cache_slots])))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)

    def step(state, cache, tokens):
        model = nnx.merge(graphdef, state)
        hidden, block_kv = model.forward(tokens, cache, causal=True, attention_kernel=True)
        return model.logits(hidden), cache.write(block_kv, cache.lengths)

    program = aot.compile_program(step, *aot.abstract((state, cache, tokens), mesh))
    return aot.cost(program).bytes, program.compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8B")
    parser.add_argument("--cache", type=int, default=2048)
    parser.add_argument("--target", default="h100")
    args = parser.parse_args()
    mesh = aot.target_mesh(args.target)
    full = nld_jax.NLDConfig.preset(args.size)
    figures = {}
    for loop in ("unroll", "scan"):
        for layers in (1, 2):
            config = dataclasses.replace(full, num_hidden_layers=layers)
            figures[loop, layers] = forward_bytes(config, loop, args.cache, mesh)[0]
    layer = figures["unroll", 2] - figures["unroll", 1]
    outside = figures["unroll", 1] - layer
    body = figures["scan", 2] - outside
    depth = full.num_hidden_layers
    print(f"jax {jax.__version__}, target {args.target}, {args.size} ({depth} layers), "
          f"decode forward T=1, {args.cache} cached slots, attention kernel on")
    print(f"per layer: unrolled {layer / 1e6:.1f} MB, scan body {body / 1e6:.1f} MB "
          f"({body / layer:.3f}x); outside the layers {outside / 1e6:.1f} MB")
    for loop, per_layer in (("unroll", layer), ("scan", body)):
        total, compile_s = forward_bytes(full, loop, args.cache, mesh)
        modelled = outside + depth * per_layer
        print(f"{loop}: {modelled / 1e9:.3f} GB per forward ({depth} layers), compile "
              f"{compile_s:.1f} s (XLA's count of the {depth}-layer program: {total / 1e9:.3f} GB)",
              flush=True)


if __name__ == "__main__":
    main()
