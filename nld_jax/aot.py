"""Compile for a Hopper GPU on a machine without one, and read what the compiler made of it.

jax 0.11.2 with its CUDA plugin (the `aot` extra) compiles any program for a described GPU on a
CPU-only machine (spec/aot.md): XLA's GPU compiler runs in full and every Pallas Mosaic-GPU
kernel is lowered to PTX and assembled by ptxas for sm_90a. This module names the targets (H100,
H200), builds meshes and abstract arguments for them, compiles, and reports what only a real
compile shows: ptxas' registers, spills and warnings per kernel, the optimised HLO (while loops,
host callbacks, kernel calls), memory, and a cost model (bytes and flops of the optimised HLO,
with each kernel counted by its own byte model).

Nothing here needs or touches a GPU; the figures are a model of the GPU run, not a timing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

import nld_jax._no_gpu  # noqa: F401  (before JAX starts its backends)

__all__ = ["Target", "TARGETS", "target_mesh", "target_layout", "abstract", "PtxasReport",
           "parse_ptxas", "Collective", "Program", "compile_program", "Cost", "cost",
           "InstructionCost", "instruction_costs",
           "KernelCase", "kernel_cases", "compile_kernel", "abstract_model", "Forward",
           "PATTERNS", "compile_forward", "compile_generate", "generate_temp_bound"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to compile for: XLA's device description plus the figures a cost model needs."""

    name: str
    description: str  # XLA's device_description_str (the device kind)
    memory_bandwidth: float  # bytes/s, the HBM peak
    device_memory: int  # bytes
    peak_flops: float  # dense bf16 tensor-core FLOP/s

    def proto(self) -> str:
        """The GpuTargetConfig text proto XLA compiles against (sm_90, 132 SMs)."""
        return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {self.device_memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 patch: 0 }}
device_description_str: "{self.description}"
"""


TARGETS = {
    # H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 (NVIDIA's datasheet).
    "h100": Target("h100", "NVIDIA H100 80GB HBM3", 3.35232e12, 84929347584, 989e12),
    # H200: the same die with 141 GB of HBM3e at 4.8 TB/s.
    "h200": Target("h200", "NVIDIA H200", 4.8e12, 150754820096, 989e12),
}


def _target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target={name!r}; expected one of {sorted(TARGETS)}")
    return TARGETS[name]


def target_mesh(target: str = "h100", devices: int = 1,
                axis_name: str = "x") -> jax.sharding.Mesh:
    """A mesh of `devices` abstract GPUs of `target` (no device is opened)."""
    if devices < 1:
        raise ValueError(f"{devices=} must be >= 1")
    topology = topologies.get_topology_desc(platform="cuda", target_config=_target(target).proto(),
                                            topology=f"1x1x{devices}")
    return topologies.make_mesh(topology, (devices,), (axis_name,))


def target_layout(target: str = "h100", *, data: int = 1, model: int = 1,
                  rules: Any = None) -> Any:
    """The nld_jax.sharding.Layout of a ("data", "model") mesh of data * model abstract GPUs of
    `target` (tensor parallel over "model", data parallel over "data"; no device is opened)."""
    from nld_jax.sharding import Layout, make_mesh

    devices = target_mesh(target, data * model).devices.flat
    return Layout.create(make_mesh(data=data, model=model, devices=devices), rules)


def abstract(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every array leaf of `tree` as a ShapeDtypeStruct replicated over `mesh`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        tree)


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    """ptxas' own report on one kernel function."""

    kernel: str  # the function name, e.g. "block_attention_kernel_mosaic_gpu_kernel"
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    messages: tuple[str, ...]  # warnings and non-routine infos (e.g. "Potential out of bound")

    @property
    def spill_bytes(self) -> int:
        """Spill stores plus spill loads, in bytes."""
        return self.spill_stores + self.spill_loads


_ROUTINE = re.compile(r"bytes gmem|Compiling entry function|Function properties for|"
                      r"Used \d+ registers|Compile time =|bytes stack frame")


def parse_ptxas(text: str) -> list[PtxasReport]:
    """The reports in ptxas' verbose output (one per compiled entry function)."""
    reports, messages, current = [], [], None
    for line in text.splitlines():
        if not line.startswith(("ptxas", "    ")):
            continue
        if match := re.search(r"Compiling entry function '([^']+)'", line):
            current = dict(kernel=match.group(1), spill_stores=0, spill_loads=0)
        elif current is not None and (
                match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(spill_stores=int(match.group(1)), spill_loads=int(match.group(2)))
        if current is not None and (match := re.search(r"Used (\d+) registers", line)):
            # Messages before "Compiling entry function" belong to that function too.
            reports.append(PtxasReport(registers=int(match.group(1)),
                                       messages=tuple(messages), **current))
            messages, current = [], None
            continue
        if line.startswith("ptxas") and not _ROUTINE.search(line):
            messages.append(line.strip())
    if messages:  # e.g. a fatal error: no function report follows it
        reports.append(PtxasReport("<unattributed>", 0, 0, 0, tuple(messages)))
    return reports


@contextlib.contextmanager
def _stdout_captured() -> Iterator[list[str]]:
    """Captures what native code writes to file descriptor 1 (ptxas' report goes there)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield captured
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


# ptxas runs once per distinct kernel per process (the plugin caches the cubin), so each
# kernel's report is kept here by the Mosaic module it came from.
_REPORTS: dict[int, list[PtxasReport]] = {}
_MOSAIC_CALL = re.compile(r'custom_call_target="mosaic_gpu_v2".*?backend_config="((?:[^"\\]|'
                          r'\\.)*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """Collectives of one kind in a program: how many, and the bytes of their results."""

    count: int
    bytes: int


# "%name = SHAPE all-reduce(" or "all-reduce-start(" (GPU async); SHAPE may be a tuple.
_COLLECTIVE = re.compile(r"=\s*(?P<shape>\(?[a-z0-9\[\],{}\s:()]*?\)?)\s+"
                         r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?P<start>-start)?\(")
_ARRAY_SHAPE = re.compile(r"\b(pred|[sufb]f?\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Program:
    """A program compiled for a target, with what the compiler reported."""

    compiled: jax.stages.Compiled
    compile_s: float  # wall time of lower + compile on this machine
    ptxas: tuple[PtxasReport, ...]  # one per Mosaic kernel in the program

    @functools.cached_property
    def hlo(self) -> str:
        """The GPU-optimised HLO text (fusions, custom calls, loops); printed once (an
        unrolled 8B program's text is megabytes, and every property below reads it)."""
        return self.compiled.as_text()

    @property
    def temp_bytes(self) -> int:
        """Device memory the program needs beyond its arguments and outputs."""
        return self.compiled.memory_analysis().temp_size_in_bytes

    @property
    def argument_bytes(self) -> int:
        """Bytes of the program's arguments (per device)."""
        return self.compiled.memory_analysis().argument_size_in_bytes

    @property
    def while_ops(self) -> int:
        """While loops in the optimised HLO (a decode loop is one)."""
        return len(re.findall(r"\swhile\(", self.hlo))

    @property
    def top_level_loops(self) -> list[int | None]:
        """The while loops of the entry computation (not nested in another loop or call): each
        one's trip count where XLA knows it (a layer scan), else None (a decode loop)."""
        hlo = _HloText(self.hlo)
        trip_counts = (loop.attribute(r'"known_trip_count":\{"n":"(\d+)"\}')
                       for loop in hlo[hlo.entry] if loop.opcode == "while")
        return [int(n) if n else None for n in trip_counts]

    @property
    def host_callbacks(self) -> int:
        """Host callbacks in the optimised HLO (each a device-to-host round trip)."""
        return len(re.findall(r'custom_call_target="[^"]*callback[^"]*"', self.hlo))

    @property
    def collectives(self) -> dict[str, Collective]:
        """The cross-device collectives of the optimised HLO by kind (all-reduce, all-gather,
        reduce-scatter, all-to-all, collective-permute): how many and the bytes of their
        results, per device (loop bodies counted once; an async pair once)."""
        found: dict[str, Collective] = {}
        for line in self.hlo.splitlines():
            match = _COLLECTIVE.search(line)
            if match is None:
                continue
            kind = match.group("kind")
            shape = match.group("shape")
            if match.group("start"):  # an async start returns ((operands), results)
                shape = shape[_closing(shape, 1) + 1:]
            nbytes = _array_bytes(shape)
            seen = found.get(kind, Collective(0, 0))
            found[kind] = Collective(seen.count + 1, seen.bytes + nbytes)
        return found

    @property
    def kernel_calls(self) -> int:
        """Mosaic-GPU kernel launches in the optimised HLO (loop bodies counted once)."""
        return self.hlo.count('custom_call_target="mosaic_gpu_v2"')


def compile_program(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = (),
                    **static: Any) -> Program:
    """jit(fn).lower(*args).compile() for the target the arguments' shardings name.

    Args:
      fn: the function; `static` keyword arguments are bound as Python values.
      *args: ShapeDtypeStructs (see `abstract`) or pytrees of them.
      donate_argnums: arguments the program may update in place (a KV cache).
    Returns:
      The Program with the ptxas report of every Mosaic kernel it contains.
    """
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # read by the plugin at each kernel's compile
    start = time.perf_counter()
    with _stdout_captured() as captured:
        compiled = jax.jit(lambda *a: fn(*a, **static), donate_argnums=donate_argnums).lower(
            *args).compile()
    compile_s = time.perf_counter() - start
    fresh = parse_ptxas(captured[0])
    reports: list[PtxasReport] = []
    for config in dict.fromkeys(_MOSAIC_CALL.findall(compiled.as_text())):
        key = hash(config)
        if key not in _REPORTS:
            if not fresh:
                raise RuntimeError("a Mosaic kernel compiled without a ptxas report; was it "
                                   "compiled earlier in this process outside compile_program?")
            _REPORTS[key] = [fresh.pop(0)]
        reports.extend(_REPORTS[key])
    return Program(compiled, compile_s, tuple(reports + fresh))


@dataclasses.dataclass(frozen=True)
class Cost:
    """Bytes moved and flops of one execution, and the time they imply on a target."""

    bytes: float
    flops: float

    def seconds(self, target: str = "h100") -> float:
        """max(bytes / bandwidth, flops / peak): a roofline estimate."""
        t = _target(target)
        return max(self.bytes / t.memory_bandwidth, self.flops / t.peak_flops)


def cost(program: Program, kernels: Cost = Cost(0, 0)) -> Cost:
    """XLA's cost analysis of the optimised HLO, corrected for gathers, plus the kernels' own
    cost model.

    XLA's HloCostAnalysis counts a while body once (cost a single forward, not a whole
    generation) and counts nothing for a Mosaic custom call; `kernels` is what the program's
    kernel launches move and compute by their own model (e.g. `block_attention.kernel_cost`
    times the launches). The one correction: a fusion is charged the input elements its
    outputs depend on where XLA charges whole inputs (`_HloText.overcharge`: a gather's table,
    split-K partials reduced and then sliced).
    """
    from jax._src.lib import _jax

    module = program.compiled.runtime_executable().hlo_modules()[0]
    analysis = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    hlo = _HloText(program.hlo)
    overcharge = sum(hlo.overcharge(instruction) for instruction in hlo[hlo.entry])
    return Cost(bytes=analysis["bytes accessed"] - overcharge + kernels.bytes,
                flops=analysis["flops"] + kernels.flops)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    """One instruction of HLO text: `[ROOT] %name = shape opcode(operands), attributes`."""

    name: str
    shape: str  # with layouts, as printed
    opcode: str
    operands: tuple[str, ...]  # instruction names, in order (repeats kept)
    attributes: str  # the text after the operand list
    root: bool  # the computation's ROOT

    @classmethod
    def parse(cls, line: str) -> _Instruction:
        head = re.match(r"\s*(ROOT )?%(\S+) = ", line)
        if head is None:
            raise ValueError(f"not an HLO instruction: {line[:200]!r}")
        rest = line[head.end():]
        if rest.startswith("("):  # a tuple shape
            end = _closing(rest, 0)
            shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
        else:
            shape, rest = rest.split(" ", 1)
        opcode = re.match(r"([a-z][a-z0-9-]*)\(", rest)
        if opcode is None:
            raise ValueError(f"no opcode in {line[:200]!r}")
        end = _closing(rest, opcode.end() - 1)
        operands = tuple(re.findall(r"%([^\s,)]+)", rest[opcode.end():end]))
        return cls(head.group(2), shape, opcode.group(1), operands, rest[end + 1:],
                   bool(head.group(1)))

    def callees(self) -> list[str]:
        """The computations this instruction calls (fused, loop body, reducer, branches)."""
        names = []
        for match in _CALLS.finditer(self.attributes):
            names += re.findall(r"%([^\s,{}]+)", match.group(1))
        return names

    def attribute(self, pattern: str) -> str:
        """The first group of `pattern` in the attributes, or ""."""
        match = re.search(pattern, self.attributes)
        return match.group(1) if match else ""


_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|"
                    r"called_computations|true_computation|false_computation|select|scatter)="
                    r"(\{[^}]*\}|%[^\s,]+)")
# Dropped from the per-instruction modules: metadata names stack frames they do not carry, and
# HLO's text parser does not take back an async collective's output_to_operand_aliasing (so an
# async all-reduce's row is charged its result buffer once more than in the whole module).
_DROPPED = re.compile(r", (metadata|output_to_operand_aliasing)=\{")


def _without_dropped(text: str) -> str:
    """`text` without its _DROPPED attributes (their values may nest braces and strings)."""
    while match := _DROPPED.search(text):
        text = text[:match.start()] + text[_closing(text, match.end() - 1) + 1:]
    return text


def _closing(text: str, start: int) -> int:
    """The index of the bracket that closes the one at text[start] ("(" or "{"), skipping
    quoted strings."""
    opening = text[start]
    closing = {"(": ")", "{": "}"}[opening]
    depth, quoted, i = 0, False, start
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {opening!r} in {text[:200]!r}")


def _array_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape (a tuple's leaves summed)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY_SHAPE.findall(shape))


def _elements(shape: str) -> int | None:
    """Elements of an array shape (None for a tuple)."""
    array = _ARRAY_SHAPE.match(shape)
    if array is None:  # a tuple or a token
        return None
    return math.prod(int(d) for d in array.group(2).split(",") if d)


# Fusion-parameter users XLA's HloCostAnalysis charges by what they take (FusionParameterReadBytes).
_SEEN_SLICING = {"slice", "dynamic-slice", "dynamic-update-slice", "broadcast", "reshape",
                 "fusion"}
# Ops each of whose output elements reads at most one element of each operand.
_ONE_TO_ONE = {
    "abs", "add", "and", "atan2", "bitcast", "broadcast", "cbrt", "ceil", "clamp", "compare",
    "concatenate", "convert", "copy", "cosine", "count-leading-zeros", "divide", "dynamic-slice",
    "erf", "exponential", "exponential-minus-one", "floor", "gather", "imag", "is-finite", "log",
    "log-plus-one", "logistic", "maximum", "minimum", "multiply", "negate", "not", "or", "pad",
    "popcnt", "power", "real", "reduce-precision", "remainder", "reshape", "reverse",
    "round-nearest-afz", "round-nearest-even", "rsqrt", "select", "shift-left",
    "shift-right-arithmetic", "shift-right-logical", "sign", "sine", "slice", "sqrt",
    "subtract", "tan", "tanh", "transpose", "xor"}


def _demanded(fused: list[_Instruction]) -> dict[str, float]:
    """Per instruction of a fused computation, the fraction of its elements the fusion's
    outputs depend on: the root's all; an operand of a one-to-one op (elementwise, slice,
    gather, transpose, ...) at most (demanded output elements) / (its elements); of a reduce
    the demanded fraction of its output; of anything else (dot, scatter, nested fusion, ...)
    all. Demand from several users adds up, capped at 1: an upper bound."""
    demand = dict.fromkeys((i.name for i in fused), 0.0)
    demand[next(i.name for i in fused if i.root)] = 1.0
    shapes = {i.name: i.shape for i in fused}
    for instruction in reversed(fused):  # HLO text lists operands before their users
        share = min(1.0, demand[instruction.name])
        if share == 0:
            continue
        out = _elements(instruction.shape)
        data = len(instruction.operands) // 2  # a reduce's inputs, then its init values
        for k, operand in enumerate(instruction.operands):
            size = _elements(shapes[operand])
            if instruction.opcode in _ONE_TO_ONE and out is not None and size:
                demand[operand] += share * out / size
            elif instruction.opcode == "reduce" and k < data:
                demand[operand] += share
            else:
                demand[operand] += 1.0
    return {name: min(1.0, value) for name, value in demand.items()}


class _HloText:
    """The computations of a module's HLO text (Program.hlo), by name."""

    def __init__(self, text: str):
        self.lines: dict[str, list[str]] = {}
        self.entry = ""
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            header = re.match(r"(ENTRY )?%(\S+) \(", lines[i])
            if header and lines[i].endswith("{"):
                end = lines.index("}", i)
                self.lines[header.group(2)] = lines[i:end + 1]
                self.entry = header.group(2) if header.group(1) else self.entry
                i = end
            i += 1
        if not self.entry:
            raise ValueError("no ENTRY computation in the HLO text")
        self._parsed: dict[str, list[_Instruction]] = {}

    def __getitem__(self, computation: str) -> list[_Instruction]:
        if computation not in self._parsed:
            self._parsed[computation] = [_Instruction.parse(line)
                                         for line in self.lines[computation][1:-1]]
        return self._parsed[computation]

    def closure(self, instruction: _Instruction) -> list[str]:
        """Every computation `instruction` calls, directly or not."""
        found, stack = [], instruction.callees()
        while stack:
            name = stack.pop()
            if name not in found:
                found.append(name)
                stack += [c for i in self[name] for c in i.callees()]
        return found

    def overcharge(self, instruction: _Instruction) -> float:
        """Bytes XLA's generic cost analysis charges `instruction` beyond the input elements
        its outputs depend on.

        A GPU fusion computes each output element from the input elements it depends on, so it
        reads the elements of a parameter that some output depends on, once each. XLA's
        HloCostAnalysis charges a parameter its whole size unless a user is a slice it sees
        (a slice, dynamic-slice, ... of the parameter itself): taking T rows of an embedding
        table with a gather costs the table, and a fusion that reduces split-K partials and then
        keeps a sixth of the columns costs all the partials. Where no user of a parameter is
        such a slice (XLA then charges its size once), the charge here is the fraction of it
        the outputs depend on (`_demanded`). For a loop or call: the overcharge of the fusions
        in the computations it calls.
        """
        if instruction.opcode != "fusion":
            return sum(self.overcharge(inner) for name in instruction.callees()
                       for inner in self[name])
        fused = self[instruction.callees()[0]]
        demanded = _demanded(fused)
        total = 0.0
        for parameter in fused:
            if parameter.opcode != "parameter" or parameter.shape.startswith("("):
                continue
            users = [i for i in fused if parameter.name in i.operands]
            if users and not any(user.opcode in _SEEN_SLICING for user in users):
                total += _array_bytes(parameter.shape) * (1 - demanded[parameter.name])
        return total

    def module(self, instruction: _Instruction, shapes: dict[str, str]) -> str:
        """HLO text of a module computing `instruction` alone: its operands are parameters,
        the computations it calls come along."""
        operands = list(dict.fromkeys(instruction.operands))
        parameters = ", ".join(f"p{k}: {shapes[name]}" for k, name in enumerate(operands))
        arguments = ", ".join(f"%p{operands.index(name)}" for name in instruction.operands)
        lines = ["HloModule one", ""]
        called = set(self.closure(instruction))
        for name in self.lines:  # in the text's order: a computation after those it calls
            if name in called:
                lines += [_without_dropped(line) for line in self.lines[name]] + [""]
        lines.append(f"ENTRY %one ({parameters}) -> {instruction.shape} {{")
        lines += [f"  %p{k} = {shapes[name]} parameter({k})" for k, name in enumerate(operands)]
        attributes = _without_dropped(instruction.attributes)
        lines += [f"  ROOT %x = {instruction.shape} {instruction.opcode}({arguments}){attributes}",
                  "}"]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class InstructionCost:
    """One instruction of a program's entry computation and what the cost model charges it."""

    name: str  # the HLO instruction, e.g. "gemm_fusion_dot.273"
    kind: str  # "loop fusion", "input fusion", "triton gemm", "custom call mosaic_gpu_v2", "copy"
    shape: str  # its result, layouts dropped, e.g. "f32[4,32,6144]"
    op: str  # the JAX operation it came from (metadata op_name, jit and layer prefixes dropped)
    bytes: float  # bytes accessed as `cost` charges them
    xla_bytes: float  # XLA's generic HloCostAnalysis of this instruction alone
    flops: float


def _kind(instruction: _Instruction, hlo: _HloText) -> str:
    """What an instruction is, in words: the fusion emitter, or the opcode."""
    if instruction.opcode == "custom-call":
        return "custom call " + instruction.attribute(r'custom_call_target="([^"]+)"')
    if instruction.opcode != "fusion":
        return instruction.opcode
    fused = hlo[instruction.callees()[0]]
    backend = instruction.attribute(r'"fusion_backend_config":\{"kind":"(__\w+)"')
    if "gemm" in backend or any(i.opcode in ("dot", "scaled-dot") for i in fused):
        return "triton gemm" if backend.startswith("__triton") else "gemm fusion"
    if backend:
        return "triton fusion" if backend == "__triton" else f"custom fusion {backend}"
    kind = {"kLoop": "loop fusion", "kInput": "input fusion", "kOutput": "output fusion"}.get(
        instruction.attribute(r"kind=(k\w+)"), "fusion")
    root = fused[-1] if fused else None
    if root is not None and root.opcode == "dynamic-update-slice":
        kind += " (in-place dynamic-update-slice)"
    return kind


def instruction_costs(program: Program, kernel: Cost = Cost(0, 0)) -> list[InstructionCost]:
    """The cost model per instruction of the program's entry computation.

    Each instruction is cut out as a module of its own (its operands become parameters, the
    computations it calls come along) and XLA's HloCostAnalysis runs on it: the same analysis
    `cost` runs on the whole module, which sums over instructions, so the rows sum to XLA's
    total (a while loop, e.g. scanned layers, is one row holding its body; an async
    all-reduce's row is charged its result once more, see _DROPPED). `bytes` applies
    `cost`'s correction (`_HloText.overcharge`); a Mosaic custom call, which XLA cannot see
    into, is charged `kernel` (one launch by the kernel's own model), so with the forward's
    per-launch kernel cost the rows sum to `cost(program, kernels)`.
    """
    from jax._src.lib import _jax
    from jaxlib import _hlo

    client = jax.devices("cpu")[0].client
    hlo = _HloText(program.hlo)
    shapes: dict[str, str] = {}
    rows = []
    for instruction in hlo[hlo.entry]:
        shapes[instruction.name] = instruction.shape
        if instruction.opcode in ("parameter", "constant"):  # no traffic (HloCostAnalysis too)
            continue
        module = _hlo.hlo_module_from_text(hlo.module(instruction, shapes))
        analysis = _jax.hlo_module_cost_analysis(client, module)
        xla_bytes, flops = analysis.get("bytes accessed", 0.0), analysis.get("flops", 0.0)
        nbytes = xla_bytes - hlo.overcharge(instruction)
        if instruction.attribute(r'custom_call_target="(mosaic_gpu_v2)"'):
            nbytes, flops = kernel.bytes, kernel.flops
        op = re.sub(r"^jit\([^)]*\)/|layer_\d+/", "",
                    instruction.attribute(r'op_name="((?:[^"\\]|\\.)*)"'))
        rows.append(InstructionCost(instruction.name, _kind(instruction, hlo),
                                    re.sub(r"\{[\d,]*\}", "", instruction.shape), op, nbytes,
                                    xla_bytes, flops))
    return rows


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One kernel at one shape the model can select, ready to compile."""

    name: str  # e.g. "block_attention T=32 S=8448"
    config: str  # the kernel's TuningConfig, as text
    fn: Callable[..., Any]
    args: tuple[jax.ShapeDtypeStruct, ...]


# The forwards the decoding modes run (spec/decoding.md): T=1 decode, refine/verify blocks,
# quadratic self-speculation's T*(T+1) block, and prompt prefills. The cache holds an 8192-token
# context plus one block of write-ahead room.
BLOCK_SIZES = (8, 16, 32)
PREFILLS = (512, 8192)
CACHE_SLOTS = 8192 + 256


def kernel_cases(model_config: Any, mesh: jax.sharding.Mesh) -> list[KernelCase]:
    """Every Pallas kernel configuration the model can select, at `model_config`'s shapes."""
    from pallas_kernels import block_attention as attention
    from pallas_kernels import block_step

    c = model_config
    n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layers = c.num_hidden_layers
    bf16, i32, f32 = jnp.bfloat16, jnp.int32, jnp.float32

    def spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return abstract(jax.ShapeDtypeStruct(shape, dtype), mesh)

    # (T, S, quadratic block size or 0)
    attention_shapes = [(1, CACHE_SLOTS, 0)] + [(t, CACHE_SLOTS, 0) for t in BLOCK_SIZES]
    attention_shapes += [(t * (t + 1), CACHE_SLOTS, t) for t in BLOCK_SIZES]
    attention_shapes += [(t, t + 256, 0) for t in PREFILLS]
    cases = []
    for t, s, quadratic in attention_shapes:
        config = attention.default_config(t * n // k, s)
        args = (spec((1, t, n, h), bf16), spec((layers, 1, s, k, h), bf16),
                spec((layers, 1, s, k, h), bf16), spec((1,), i32), spec((1, t, k, h), bf16),
                spec((1, t, k, h), bf16), spec((), jnp.bool_), spec((), i32))
        name = f"block_attention T={t} S={s}" + (f" quadratic={quadratic}" if quadratic else "")
        cases.append(KernelCase(name, repr(config), functools.partial(
            attention.block_attention, quadratic=quadratic), args))
    for t in BLOCK_SIZES:  # greedy refine and verify steps of the block modes
        config = block_step.TuningConfig()
        cases.append(KernelCase(f"vocab_stats T={t}", repr(config), block_step.vocab_stats,
                                (spec((1, t, c.vocab_size), f32),)))
    return cases


def compile_kernel(case: KernelCase) -> Program:
    """Compiles one kernel case (its arguments carry the target mesh)."""
    return compile_program(case.fn, *case.args)


def abstract_model(model_config: Any, mesh: jax.sharding.Mesh,
                   dtype: Any = jnp.bfloat16, layout: Any = None) -> tuple[Any, Any]:
    """(graphdef, abstract state) of an NLDModel: shapes only, no weights in memory; every
    parameter replicated over `mesh`, or with `layout` (an nld_jax.sharding.Layout on `mesh`)
    placed on its shards as nld_jax.sharding.shard_model places it."""
    from flax import nnx

    from nld_jax.model import NLDModel

    model = nnx.eval_shape(lambda: NLDModel(model_config, dtype=dtype, rngs=nnx.Rngs(0)))
    if layout is not None:
        model.layout = nnx.static(layout)
    graphdef, state = nnx.split(model)
    return graphdef, _abstract_state(state, mesh, layout)


def _abstract_state(state: Any, mesh: jax.sharding.Mesh, layout: Any) -> Any:
    """A model state as ShapeDtypeStructs: replicated, or sharded by `layout`."""
    from flax import nnx

    if layout is None:
        return abstract(state, mesh)
    if layout.mesh != mesh:
        raise ValueError("layout= must be a layout of mesh= (nld_jax.aot.target_layout)")
    pure = nnx.to_pure_dict(state)
    placed = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=sharding),
                          pure, layout.param_shardings(pure))
    nnx.replace_by_pure_dict(state, placed)
    return state


@dataclasses.dataclass(frozen=True)
class Forward:
    """One model forward compiled for a target, with its cost model."""

    name: str
    tokens: int  # T
    slots: int  # S, the cache capacity
    valid: int  # cached positions the forward attends to
    program: Program
    cost: Cost
    ideal: Cost  # parameter bytes read + the valid K/V; the matmul flops
    kernel: Cost = Cost(0, 0)  # one attention kernel launch by its own model (none: xla)

    def instructions(self) -> list[InstructionCost]:
        """The cost model per instruction (`instruction_costs`); with the layers unrolled (the
        GPU default) the rows sum to `cost`."""
        return instruction_costs(self.program, self.kernel)


PATTERNS = ("causal", "prefill", "quadratic")


def compile_forward(model_config: Any, tokens: int, slots: int, valid: int, *,
                    mesh: jax.sharding.Mesh, attention: str = "pallas",
                    pattern: str = "causal", name: str = "", layout: Any = None,
                    layer_loop: str = "unroll") -> Forward:
    """A batch-1 forward of T `tokens` against a cache of `slots` with `valid` cached positions.

    pattern "causal": a decode forward (T=1 or a block) writing its K/V and returning float32
    logits for all T positions; "prefill": the block attends to itself alone and returns the
    last position's logits; "quadratic": quadratic self-speculation's forward of
    T = b*(b+1) tokens for block b (the kernel computes its pattern, XLA takes the explicit
    mask; logits of the b chain positions and one group).

    `layout` (nld_jax.aot.target_layout, on `mesh`): the parameters, the KV cache and the block
    partitioned as generate() partitions them on a mesh (the cost model is then per device).
    `layer_loop`: "unroll" (what "auto" does on a GPU) or "scan" (compiles faster).
    """
    from flax import nnx

    from nld_jax.cache import KVCache
    from nld_jax.decode.self_spec_quadratic import block_layout
    from pallas_kernels.block_attention import kernel_cost

    if pattern not in PATTERNS:
        raise ValueError(f"{pattern=}; expected one of {PATTERNS}")
    c = model_config
    graphdef, state = abstract_model(c, mesh, layout=layout)
    cache = jax.eval_shape(lambda: KVCache.empty(
        num_layers=c.num_hidden_layers, batch=1, capacity=slots,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=jnp.bfloat16))
    cache = abstract(cache, mesh)
    block = abstract(jax.ShapeDtypeStruct((1, tokens), jnp.int32), mesh)
    if layout is not None:  # as generate() places them: the cache over kv heads and rows
        from nld_jax.sharding import CACHE_AXES

        cache = KVCache(*(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout.sharding(axes))
                          for x, axes in ((cache.k, CACHE_AXES), (cache.v, CACHE_AXES),
                                          (cache.lengths, ("batch",)))))
        block = jax.ShapeDtypeStruct(block.shape, block.dtype,
                                     sharding=layout.sharding(("batch", None)))
    size = int(round((tokens + 0.25) ** 0.5 - 0.5))  # b with b * (b + 1) = T
    if pattern == "quadratic" and size * (size + 1) != tokens:
        raise ValueError(f"a quadratic forward has T = b*(b+1) tokens, got {tokens=}")

    kernel = attention == "pallas"

    def forward(state, cache, block):
        model = nnx.merge(graphdef, state)
        # "auto" scans on the CPU this compiles on; on a GPU it unrolls (see NLDModel).
        model.layer_loop = layer_loop
        if pattern == "prefill":
            # The kernel reads the empty cache (no valid slot); XLA attends to the block alone.
            hidden, block_kv = model.forward(block, cache if kernel else None, causal=True,
                                             attention_kernel=kernel)
            return (model.logits(hidden[:, -1:]),
                    cache.write(block_kv, jnp.zeros_like(cache.lengths)))
        if pattern == "causal":
            hidden, block_kv = model.forward(block, cache, causal=True, attention_kernel=kernel)
            return model.logits(hidden), cache.write(block_kv, cache.lengths)
        offsets, _, visible = block_layout(size)
        hidden, block_kv = model.forward(
            block, cache, causal=True, block_mask=None if kernel else jnp.asarray(visible),
            positions=cache.lengths[:, None] + jnp.asarray(offsets)[None, :],
            attention_kernel=kernel, quadratic=size if kernel else 0)
        return model.logits(hidden[:, :2 * size]), cache.write(block_kv, cache.lengths)

    program = compile_program(forward, state, cache, block, donate_argnums=(1,))
    attended = 0 if pattern == "prefill" else valid
    launch = Cost(0, 0)  # one attention kernel launch, by the kernel's own model
    if attention == "pallas":
        launch = Cost(*kernel_cost(1, tokens, c.num_attention_heads, c.num_key_value_heads,
                                   c.head_dim, attended, slots=slots,
                                   causal=pattern != "quadratic"))
    layers = c.num_hidden_layers
    kernels = Cost(layers * launch.bytes, layers * launch.flops)
    logit_rows = {"causal": tokens, "prefill": 1, "quadratic": 2 * size}[pattern]
    # (query, key) pairs inside the block: causal, or the quadratic pattern's visible pairs.
    own_pairs = (int(block_layout(size)[2].sum()) if pattern == "quadratic"
                 else tokens * (tokens + 1) // 2)
    return Forward(name or f"T={tokens}", tokens, slots, valid, program, cost(program, kernels),
                   _ideal(c, tokens, attended, logit_rows, own_pairs), launch)


def _ideal(c: Any, tokens: int, valid: int, logit_rows: int, own_pairs: int) -> Cost:
    """What a forward cannot avoid: every weight read once (the embedding only at the T rows
    it gathers), the valid K/V read once and the block's written once; the matmul flops (the
    head only at the `logit_rows` rows whose logits are needed; attention over the prefix and
    the block's `own_pairs` visible (query, key) pairs)."""
    d, layers, kv, h = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    n, f, v = c.num_attention_heads, c.intermediate_size, c.vocab_size
    per_layer = d * (n + 2 * kv) * h + n * h * d + 3 * d * f + 2 * d
    kv_bytes = 2 * layers * (valid + tokens) * kv * h * 2
    weight_bytes = 2 * (layers * per_layer + d * v + d + tokens * d)
    attention_flops = 4 * layers * n * h * (tokens * valid + own_pairs)
    flops = 2 * tokens * layers * per_layer + 2 * logit_rows * d * v + attention_flops
    return Cost(bytes=weight_bytes + kv_bytes, flops=flops)


class _Captured(Exception):
    """Raised by the stand-in program: generate() has prepared its arguments."""


def compile_generate(model_config: Any, mode: str, prompt: int, new_tokens: int, *,
                     mesh: jax.sharding.Mesh, layer_loop: str = "unroll",
                     layout: Any = None) -> Program:
    """The whole program generate() runs for one batch-1 request, compiled for the target.

    generate() runs its own checks and bucketing on an abstract model (no weights); the kernels
    are chosen as "auto" chooses them on a Hopper GPU, and the layers loop as `layer_loop`
    ("unroll": what "auto" does on a GPU; "scan" compiles faster). The program generate()
    would call is compiled instead of run. (The streaming variant cannot be compiled without a
    GPU: its host callback's lowering asks for the CUDA backend.)
    With `layout` (nld_jax.aot.target_layout, on `mesh`) the model is sharded as
    nld_jax.sharding.shard_model shards it, and generate() partitions its program.
    """
    import importlib

    from flax import nnx

    import nld_jax
    from nld_jax import kernels
    from nld_jax.model import NLDModel

    generate_module = importlib.import_module("nld_jax.generate")
    model = nnx.eval_shape(lambda: NLDModel(model_config, dtype=jnp.bfloat16,
                                            rngs=nnx.Rngs(0)))
    model.layer_loop = layer_loop
    if layout is not None:
        model.layout = nnx.static(layout)
    program, hopper = generate_module._program, kernels.on_hopper
    captured: dict[str, Any] = {}

    def capture(graphdef: Any, *args: Any, static: Any) -> None:
        captured.update(graphdef=graphdef, args=args, static=static)
        raise _Captured

    generate_module._program, kernels.on_hopper = capture, lambda: True
    try:
        nld_jax.generate(model, [[1] * prompt], mode=mode, max_new_tokens=new_tokens)
    except _Captured:
        pass
    finally:
        generate_module._program, kernels.on_hopper = program, hopper
    if not captured:
        raise RuntimeError("generate() did not reach its program")
    state, *rest = captured["args"]
    return compile_program(functools.partial(program, captured["graphdef"],
                                             static=captured["static"]),
                           _abstract_state(state, mesh, layout), *abstract(rest, mesh))


def generate_temp_bound(model_config: Any, prompt: int, new_tokens: int, block: int) -> int:
    """An upper bound, from first principles, on a batch-1 generate program's temp memory.

    The KV cache, created inside the program: 2 x L x S x K x H bf16 for S = the prompt bucket
    + the output bucket + room for two quadratic blocks; the prefill's K/V of every layer before
    it is written (2 x L x P x K x H bf16); one layer's activations of the widest forward, the
    prefill of P tokens, every value counted in float32: gate, up and their product (3F), q/k/v
    and the attention output with its partials (2(N + 2K)H), the residual stream, norms and the
    hidden states (4D); the logits of the widest block step (b(b+1) x V float32); and 64 MiB of
    small buffers (token buffers, sampling state).
    """
    from nld_jax.generate import _bucket

    c = model_config
    bucket, out = _bucket(prompt), _bucket(new_tokens)
    slots = bucket + out + 2 * block * (block + 1)
    layers, kv, h = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    cache = 2 * layers * slots * kv * h * 2
    prefill_kv = 2 * layers * bucket * kv * h * 2
    per_token = (3 * c.intermediate_size + 2 * (c.num_attention_heads + 2 * kv) * h
                 + 4 * c.hidden_size)
    activations = bucket * per_token * 4
    logits = block * (block + 1) * c.vocab_size * 4
    return cache + prefill_kv + activations + logits + (64 << 20)
