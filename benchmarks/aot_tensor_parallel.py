"""Tensor-parallel programs compiled for several H100s on a machine without one.

The 8B and 14B decode forwards (T=1 and a T=32 block against a 1024 + 256-token context) and
whole generate programs (AR, self_spec) are compiled by XLA's GPU compiler for a deviceless
topology of TP H100s (nld_jax.aot.target_layout: a 1 x TP ("data", "model") mesh, the weights
sharded by nld_jax.sharding's rules). Per program: compile time here, per-device argument and
temp memory (XLA's memory analysis), and the collectives of the optimised HLO by kind (count
and result bytes per device; a loop body counted once, so a decode loop's step is counted once).
The kernels are off on a mesh (the XLA attention runs), as generate() chooses there today.

This describes compiled programs, not a GPU run.

    python benchmarks/aot_tensor_parallel.py --size 8B --tp 8 --json tp.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

import jax

import nld_jax
from nld_jax import aot

PROMPT, GENERATED = 1024, 256
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _row(name: str, program: aot.Program) -> dict:
    memory = program.compiled.memory_analysis()
    return dict(program=name, compile_s=round(program.compile_s, 1),
                argument_bytes=memory.argument_size_in_bytes,
                temp_bytes=memory.temp_size_in_bytes,
                collectives={kind: [c.count, c.bytes] for kind, c in program.collectives.items()})


def measure(size: str, tp: int, programs: list[str], layer_loop: str) -> list[dict]:
    """Compiles the chosen programs of `size` under TP=`tp`; one row each."""
    config = nld_jax.NLDConfig.preset(size)
    layout = aot.target_layout("h100", model=tp)
    slots = -(-(PROMPT + GENERATED + 64) // 64) * 64
    rows = []
    for name in programs:
        if name.startswith("T="):
            tokens = int(name[2:])
            forward = aot.compile_forward(config, tokens, slots, PROMPT + GENERATED,
                                          mesh=layout.mesh, attention="xla", layout=layout,
                                          layer_loop=layer_loop)
            program = forward.program
        else:
            program = aot.compile_generate(config, name, PROMPT, GENERATED, mesh=layout.mesh,
                                           layer_loop=layer_loop, layout=layout)
        rows.append(dict(size=size, tp=tp, layer_loop=layer_loop, **_row(name, program)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| size | TP | program | layers | compile s | args GB/dev | temp GB/dev | "
             "collectives (count, MB per device) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        found = ", ".join(f"{kind} {count} ({nbytes / 1e6:.2f})" for kind in KINDS
                          for count, nbytes in [r["collectives"].get(kind, (0, 0))] if count)
        found = found or "none"
        lines.append(f"| {r['size']} | {r['tp']} | {r['program']} | {r['layer_loop']} | "
                     f"{r['compile_s']} | {_gb(r['argument_bytes'])} | {_gb(r['temp_bytes'])} | "
                     f"{found} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["8B", "14B"])
    parser.add_argument("--tp", nargs="+", type=int, default=[8])
    parser.add_argument("--programs", nargs="+", default=["T=1", "T=32", "ar", "self_spec"])
    parser.add_argument("--layer-loop", default="unroll", choices=("unroll", "scan"))
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = [row for size in args.size for tp in args.tp
            for row in measure(size, tp, args.programs, args.layer_loop)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    print(f"jax {jax.__version__}, commit {head}, {datetime.date.today()}; compiled on a "
          f"CPU-only machine (not a GPU run)\n\n{table(rows)}")
    return rows


if __name__ == "__main__":
    main()
