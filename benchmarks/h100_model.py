"""A compiled-program model of batch-1 decoding on an H100/H200, built on a machine without one.

Every forward shape the decoding modes run is compiled for the target by XLA's GPU compiler
(nld_jax.aot: deviceless, Pallas kernels through ptxas). Per forward: bytes accessed and flops
of the optimised HLO (the attention kernel counted by its own byte model, the tiles it reads),
estimated time = max(bytes / bandwidth, flops / peak), and the ratio to the ideal (parameter
bytes a forward must read + the K/V it needs, over bandwidth; the matmul flops over peak when
those dominate). Per mode: modelled tokens/s from those times and tokens per forward (AR: 1;
the block modes: NVIDIA's published acceptance figures, spec/decoding.md), beside NVIDIA's
published throughputs. Per kernel configuration: ptxas registers and spill bytes.

This is a model of the compiled programs, not a measurement on a GPU.

    python benchmarks/h100_model.py --size 8B --target h100 --json model.json
    python benchmarks/h100_model.py --fusions 20 --forwards decode,block  # where bytes go
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import subprocess
import sys

import jax

import nld_jax
from nld_jax import aot

PROMPT, GENERATED = 1024, 256  # the decode context: a 1024-token prompt, 256 tokens generated

# Tokens per forward of the block modes as NVIDIA published them for the 8B (spec/decoding.md);
# the modelled tokens/s use these, not our acceptance.
PUBLISHED_TOKENS_PER_CYCLE = {
    "self_spec": (6.82, "acceptance length 6.82 at draft length 31 (with the LoRA)"),
    "self_spec_quadratic": (6.4, "up to 6.4x tokens per forward over AR"),
    "diffusion": (2.6, "2.6x tokens per forward over AR"),
}
PUBLISHED_THROUGHPUT = ("NVIDIA, 8B, concurrency 1: GB200 + SGLang 850 tok/s LinearSpec, 253 "
                        "AR, 1015 with custom kernels; B200 about 865 tok/s LinearSpec; A100 + "
                        "HF code 57 tok/s (other GPUs: for scale, not comparable)")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    slots: int
    valid: int
    pattern: str
    attention: str


def forward_shapes(config: nld_jax.NLDConfig) -> list[Shape]:
    """The forwards of every mode at batch 1: decode, block, quadratic and two prefills."""
    block = config.block_size
    slots = -(-(PROMPT + GENERATED + block * (block + 1)) // 64) * 64
    valid = PROMPT + GENERATED
    return [
        Shape("decode T=1", 1, slots, valid, "causal", "pallas"),
        Shape(f"block T={block}", block, slots, valid, "causal", "pallas"),
        Shape(f"quadratic T={block}*{block + 1}", block * (block + 1), slots, valid,
              "quadratic", "pallas"),
        Shape("prefill 512", 512, 512 + 256, 0, "prefill", "pallas"),
        Shape("prefill 8192", 8192, 8192 + 256, 0, "prefill", "pallas"),
    ]


def model_forwards(config: nld_jax.NLDConfig, mesh: jax.sharding.Mesh, target: str,
                   fusions: int = 0, only: tuple[str, ...] = ()) -> list[dict]:
    """Each forward's cost model; with `fusions`, its `fusions` costliest instruction groups
    printed too (`fusion_table`). `only`: the forwards whose name starts with one of these."""
    rows = []
    for shape in forward_shapes(config):
        if only and not shape.name.startswith(only):
            continue
        forward = aot.compile_forward(config, shape.tokens, shape.slots, shape.valid, mesh=mesh,
                                      attention=shape.attention, pattern=shape.pattern,
                                      name=shape.name)
        if fusions:
            print(fusion_table(forward, fusions) + "\n")
        est, ideal = forward.cost.seconds(target), forward.ideal.seconds(target)
        rows.append(dict(name=shape.name, T=shape.tokens, S=shape.slots, valid=shape.valid,
                         attention=shape.attention, bytes=forward.cost.bytes,
                         flops=forward.cost.flops, est_ms=est * 1e3, ideal_ms=ideal * 1e3,
                         ratio=est / ideal, compile_s=forward.program.compile_s,
                         temp_bytes=forward.program.temp_bytes))
        print(f"  {shape.name}: {est * 1e3:.3f} ms ({est / ideal:.3f}x ideal), compiled in "
              f"{forward.program.compile_s:.1f} s", file=sys.stderr)
    return rows


def fusion_table(forward: aot.Forward, top: int) -> str:
    """The `top` costliest groups of a forward's instructions by bytes accessed, as Markdown.

    Per instruction: XLA's HloCostAnalysis of that instruction cut out as a module of its own
    (nld_jax.aot.instruction_costs), the same analysis the whole-program figure comes from;
    a group is the instructions of one kind, JAX op and shape (one per layer, usually).
    """
    rows = forward.instructions()
    groups: dict[tuple[str, str, str], list[aot.InstructionCost]] = {}
    for row in rows:
        groups.setdefault((row.kind, row.op, row.shape), []).append(row)
    ranked = sorted(groups.items(), key=lambda item: -sum(r.bytes for r in item[1]))
    total, generic = sum(r.bytes for r in rows), sum(r.xla_bytes for r in rows)
    lines = [f"{forward.name}: {len(rows)} instructions, {total / 1e9:.3f} GB summed "
             f"(whole-program cost model {forward.cost.bytes / 1e9:.3f} GB; XLA's generic "
             f"figure {generic / 1e9:.3f} GB: no kernel, whole inputs where a fusion needs a "
             f"part)", "",
             "| GB | share | count | kind | op | shape | GB, XLA generic |",
             "|---|---|---|---|---|---|---|"]
    for (kind, op, shape), members in ranked[:top]:
        nbytes = sum(r.bytes for r in members)
        lines.append(f"| {nbytes / 1e9:.3f} | {nbytes / total:.1%} | {len(members)} | {kind} | "
                     f"{op or '-'} | {shape} | {sum(r.xla_bytes for r in members) / 1e9:.3f} |")
    return "\n".join(lines)


def model_kernels(config: nld_jax.NLDConfig, mesh: jax.sharding.Mesh) -> list[dict]:
    rows = []
    for case in aot.kernel_cases(config, mesh):
        program = aot.compile_kernel(case)
        for report in program.ptxas:
            rows.append(dict(name=case.name, config=case.config, registers=report.registers,
                             spill_bytes=report.spill_bytes, messages=list(report.messages)))
    return rows


def model_programs(config: nld_jax.NLDConfig, mesh: jax.sharding.Mesh) -> list[dict]:
    """Each mode's whole generate program (prompt PROMPT, GENERATED new tokens), the layers
    scanned (the GPU default unrolls them: slower to compile, one while loop)."""
    rows = []
    for mode in nld_jax.MODES:
        program = aot.compile_generate(config, mode, PROMPT, GENERATED, mesh=mesh,
                                       layer_loop="scan")
        rows.append(dict(mode=mode, compile_s=program.compile_s,
                         temp_bytes=program.temp_bytes, while_ops=program.while_ops,
                         top_level_loops=program.top_level_loops,
                         kernel_calls=program.kernel_calls))
        print(f"  {mode}: compiled in {program.compile_s:.1f} s", file=sys.stderr)
    return rows


def model_modes(forwards: list[dict]) -> list[dict]:
    """Modelled batch-1 tokens/s per mode from the forward times."""
    ms = {row["name"].split()[0]: row["est_ms"] for row in forwards}
    rows = [dict(mode="ar", tokens_per_cycle=1.0, forwards_per_cycle="1 decode",
                 cycle_ms=ms["decode"], source="one token per forward")]
    tokens, source = PUBLISHED_TOKENS_PER_CYCLE["self_spec"]
    rows.append(dict(mode="self_spec", tokens_per_cycle=tokens,
                     forwards_per_cycle="2 block (draft + verify)", cycle_ms=2 * ms["block"],
                     source=source))
    tokens, source = PUBLISHED_TOKENS_PER_CYCLE["self_spec_quadratic"]
    rows.append(dict(mode="self_spec_quadratic", tokens_per_cycle=tokens,
                     forwards_per_cycle="1 quadratic", cycle_ms=ms["quadratic"], source=source))
    tokens, source = PUBLISHED_TOKENS_PER_CYCLE["diffusion"]
    rows.append(dict(mode="diffusion", tokens_per_cycle=tokens, forwards_per_cycle="1 block",
                     cycle_ms=ms["block"], source=source))
    for row in rows:
        row["tokens_per_s"] = 1e3 * row["tokens_per_cycle"] / row["cycle_ms"]
    return rows


def table(result: dict) -> str:
    """The Markdown tables of a result."""
    lines = [f"Compiled-program model (not a GPU measurement): {result['size']} on "
             f"{result['target']}, jax {result['jax']}, commit {result['commit']}, "
             f"{result['date']}.", "",
             "| forward | T | S (valid) | attention | GB | TFLOP | est ms | ideal ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in result["forwards"]:
        lines.append(f"| {f['name']} | {f['T']} | {f['S']} ({f['valid']}) | {f['attention']} | "
                     f"{f['bytes'] / 1e9:.2f} | {f['flops'] / 1e12:.2f} | {f['est_ms']:.3f} | "
                     f"{f['ideal_ms']:.3f} | {f['ratio']:.3f} |")
    lines += ["", "| mode | forwards per cycle | tokens per cycle (source) | cycle ms | "
              "modelled tok/s |", "|---|---|---|---|---|"]
    for m in result["modes"]:
        lines.append(f"| {m['mode']} | {m['forwards_per_cycle']} | {m['tokens_per_cycle']} "
                     f"({m['source']}) | {m['cycle_ms']:.3f} | {m['tokens_per_s']:.0f} |")
    lines += ["", f"Published: {PUBLISHED_THROUGHPUT}.", "",
              "| kernel | config | registers | spill bytes |", "|---|---|---|---|"]
    for k in result["kernels"]:
        lines.append(f"| {k['name']} | {k['config']} | {k['registers']} | {k['spill_bytes']} |")
    if result["programs"]:
        lines += ["", f"Whole generate programs (prompt {PROMPT}, {GENERATED} new tokens, layers "
                  "scanned):", "", "| program | compile s | temp GB | while ops |",
                  "|---|---|---|---|"]
        for p in result["programs"]:
            lines.append(f"| {p['mode']} | {p['compile_s']:.1f} | {p['temp_bytes'] / 1e9:.2f} | "
                         f"{p['while_ops']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8B", choices=["3B", "8B", "14B"])
    parser.add_argument("--target", default="h100", choices=sorted(aot.TARGETS))
    parser.add_argument("--json", type=pathlib.Path, help="write the result here")
    parser.add_argument("--fusions", type=int, default=0, metavar="N",
                        help="only the forwards, each with its N costliest instruction groups")
    parser.add_argument("--forwards", default="", metavar="NAMES",
                        help="with --fusions: these forwards only, by name prefix, comma "
                        "separated (e.g. decode,block)")
    args = parser.parse_args(argv)
    config = nld_jax.NLDConfig.preset(args.size)
    mesh = aot.target_mesh(args.target)
    if args.fusions:
        only = tuple(name for name in args.forwards.split(",") if name)
        return dict(forwards=model_forwards(config, mesh, args.target, args.fusions, only))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
    forwards = model_forwards(config, mesh, args.target)
    result = dict(size=args.size, target=args.target, jax=jax.__version__, commit=commit,
                  date=datetime.date.today().isoformat(), forwards=forwards,
                  kernels=model_kernels(config, mesh), programs=model_programs(config, mesh),
                  modes=model_modes(forwards))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
