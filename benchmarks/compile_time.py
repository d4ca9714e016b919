"""Compile time of whole generate() programs at a released shape, without any weights.

    python benchmarks/compile_time.py --size 8B --modes ar diffusion self_spec
    python benchmarks/compile_time.py --size 8B --target h100     # needs the aot extra

The model is built abstractly (nnx.eval_shape: ShapeDtypeStruct parameters), generate() runs its
own argument checks and bucketing, and the jitted program it would call is lowered and compiled
for the default backend instead of run; with --target, for that GPU (nld_jax.aot) with the
kernels "auto" picks on a Hopper and the layer loop of --layer-loop. Prints one line per mode:
the fastest of --repeats lowerings and compilations (the machine may be shared: the minimum is
the least disturbed).
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
from flax import nnx

import nld_jax
import nld_jax.kernels
from nld_jax.model import NLDModel

generate_module = importlib.import_module("nld_jax.generate")


class _Compiled(Exception):
    """Raised by the stand-in program once it has compiled: generate() stops there."""


def compile_seconds(model: NLDModel, mode: str, prompt: int, new: int,
                    mesh: jax.sharding.Mesh | None) -> tuple[float, float]:
    """(lower s, compile s) of the program generate() would run for this request (for the
    target of `mesh`, or the default backend)."""
    program = generate_module._program
    times: list[float] = []

    def compile_only(graphdef, *args, **kwargs):
        jax.clear_caches()  # each repeat traces, lowers and compiles from scratch
        if mesh is not None:
            from nld_jax import aot

            args = aot.abstract(args, mesh)
        start = time.perf_counter()
        lowered = program.lower(graphdef, *args, **kwargs)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        lowered.compile()
        times.append(time.perf_counter() - start)
        raise _Compiled

    generate_module._program = compile_only
    try:
        nld_jax.generate(model, [[1] * prompt], mode=mode, max_new_tokens=new)
    except _Compiled:
        return times[0], times[1]
    finally:
        generate_module._program = program
    raise RuntimeError("generate() did not reach its program")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8B")
    parser.add_argument("--modes", nargs="+", default=list(generate_module.MODES))
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", default=None, help="a GPU of nld_jax.aot (e.g. h100)")
    parser.add_argument("--layer-loop", default="auto", help="NLDModel.layer_loop")
    args = parser.parse_args()
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = nld_jax.NLDConfig.preset(args.size, **overrides)
    model = nnx.eval_shape(lambda: NLDModel(config, dtype="bfloat16", rngs=nnx.Rngs(0)))
    model.layer_loop = args.layer_loop
    mesh = None
    if args.target is not None:
        from nld_jax import aot

        mesh = aot.target_mesh(args.target)
        nld_jax.kernels.on_hopper = lambda: True  # "auto" chooses the kernels as on the target
    print(f"jax {jax.__version__}, target {args.target or jax.default_backend()}, "
          f"layer_loop {args.layer_loop}, {args.size} "
          f"({config.num_hidden_layers} layers), prompt {args.prompt}, {args.new} new tokens")
    for mode in args.modes:
        runs = [compile_seconds(model, mode, args.prompt, args.new, mesh)
                for _ in range(args.repeats)]
        print(f"{mode}: lower {min(r[0] for r in runs):.1f} s, compile "
              f"{min(r[1] for r in runs):.1f} s (all compiles: "
              f"{', '.join(f'{r[1]:.1f}' for r in runs)})", flush=True)


if __name__ == "__main__":
    main()
