"""KV-cache bytes per token and the context that fits on one GPU, from the config presets.

Arithmetic, not a measurement: every figure derives from `NLDConfig.preset(size)` and the
assumptions below, so BENCHMARKS.md's table is this script's output (tests check they agree).

- Weights bf16, sharded over tensor parallelism TP: heads and the MLP split over TP, the
  embedding and the head vocab-parallel; RMSNorm weights replicated.
- KV cache bf16 (K and V, every layer), sharded over KV heads. A mesh axis must divide the
  dimension it shards, so when TP does not divide K (e.g. K < TP) the KV heads are replicated:
  every device holds all K heads.
- Usable device memory: `MEMORY_FRACTION` of the device memory XLA is told of in
  `nld_jax.aot.TARGETS` (JAX preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says
  otherwise; set it to 0.95 for these figures), minus
  `RESERVE_GIB` for the CUDA/XLA runtime, compiled-program temporaries and fragmentation. The
  chunked prefill's own activations with the Pallas attention kernel are O(chunk) and printed
  below (well inside the reserve); the XLA attention path instead materialises float32 scores
  [chunk, N/TP, S] per layer, also printed: at a full context that alone may not fit.
- Context = (usable - weights) / (KV bytes per token per device), summed over the batch; one
  sequence is capped at config.max_position_embeddings.

    python benchmarks/kv_capacity.py [--chunk 512]
"""

from __future__ import annotations

import argparse
import dataclasses

from nld_jax.aot import TARGETS
from nld_jax.config import NLDConfig

SIZES = ("3B", "8B", "14B")
TENSOR_PARALLEL = (1, 2, 4, 8)
MIB = 1 << 20
GIB = 1 << 30
GPUS = {"H100 80GB": TARGETS["h100"].device_memory, "H200 141GB": TARGETS["h200"].device_memory}
MEMORY_FRACTION = 0.95
RESERVE_GIB = 4
BF16 = 2
F32 = 4


@dataclasses.dataclass(frozen=True)
class Capacity:
    """One (size, TP) row."""

    size: str
    tp: int
    kv_heads_per_device: int
    kv_bytes_per_token: int  # the whole model, all devices together
    kv_bytes_per_token_per_device: int
    weight_bytes_per_device: int
    tokens_per_device: dict[str, int]  # KV tokens that fit, summed over the batch
    max_positions: int

    def longest(self, gpu: str) -> int:
        """The longest single sequence (batch 1)."""
        return min(self.tokens_per_device[gpu], self.max_positions)

    def full_length_sequences(self, gpu: str) -> int:
        """How many sequences of max_position_embeddings tokens fit at once."""
        return self.tokens_per_device[gpu] // self.max_positions


def kv_bytes_per_token(config: NLDConfig, kv_heads: int) -> int:
    """K and V of every layer for one token, `kv_heads` heads of head_dim, bf16."""
    return 2 * config.num_hidden_layers * kv_heads * config.head_dim * BF16


def kv_heads_per_device(config: NLDConfig, tp: int) -> int:
    """K/TP when TP divides K, else K (the kv-head axis is replicated)."""
    k = config.num_key_value_heads
    return k // tp if k % tp == 0 else k


def weight_bytes_per_device(config: NLDConfig, tp: int) -> int:
    """bf16 weights on one device: everything but the RMSNorm weights is split over TP."""
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    return (-(-(config.num_parameters - norms) // tp) + norms) * BF16


def capacity(size: str, tp: int) -> Capacity:
    config = NLDConfig.preset(size)
    heads = kv_heads_per_device(config, tp)
    per_device = kv_bytes_per_token(config, heads)
    weights = weight_bytes_per_device(config, tp)
    tokens = {}
    for gpu, total in GPUS.items():
        usable = int(total * MEMORY_FRACTION) - RESERVE_GIB * GIB - weights
        tokens[gpu] = max(usable, 0) // per_device
    return Capacity(size=size, tp=tp, kv_heads_per_device=heads,
                    kv_bytes_per_token=kv_bytes_per_token(config, config.num_key_value_heads),
                    kv_bytes_per_token_per_device=per_device, weight_bytes_per_device=weights,
                    tokens_per_device=tokens, max_positions=config.max_position_embeddings)


def chunk_workspace_bytes(config: NLDConfig, tp: int, chunk: int) -> int:
    """Per-layer activations of one prefill chunk with the Pallas attention kernel (bf16).

    Hidden state and residual [C, D] x 2, the normed input [C, D], q/k/v [C, (N + 2K) H / TP],
    the attention output [C, N H / TP], gate, up and their product [C, F / TP] x 3.
    """
    c, d, f, h = chunk, config.hidden_size, config.intermediate_size, config.head_dim
    n, k = config.num_attention_heads, kv_heads_per_device(config, tp) * tp
    return c * (3 * d + (2 * n + 2 * k) * h // tp + 3 * f // tp) * BF16


def xla_scores_bytes(config: NLDConfig, tp: int, chunk: int) -> int:
    """The XLA attention path's float32 scores [C, N/TP, S] of one layer at a full context."""
    return chunk * config.num_attention_heads // tp * config.max_position_embeddings * F32


def table(chunk: int = 512) -> str:
    """BENCHMARKS.md's markdown, from the presets."""
    gpus = list(GPUS)
    head = ["model", "TP", "kv heads / device", "KV KiB / token (model)",
            "KV KiB / token / device", "weights GiB / device"]
    for gpu in gpus:
        head += [f"KV tokens / device, {gpu}", f"longest context, {gpu}",
                 f"full-length sequences, {gpu}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in SIZES:
        for tp in TENSOR_PARALLEL:
            row = capacity(size, tp)
            cells = [size, str(tp), str(row.kv_heads_per_device),
                     f"{row.kv_bytes_per_token / 1024:g}",
                     f"{row.kv_bytes_per_token_per_device / 1024:g}",
                     f"{row.weight_bytes_per_device / GIB:.2f}"]
            for gpu in gpus:
                cells += [f"{row.tokens_per_device[gpu]:,}", f"{row.longest(gpu):,}",
                          str(row.full_length_sequences(gpu))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Prefill chunk {chunk}: per-layer activations with the Pallas kernel, and the "
              "XLA attention path's float32 scores at a full context (one layer, transient):", "",
              "| model | TP | Pallas chunk activations MiB | XLA chunk scores GiB |",
              "|---|---|---|---|"]
    for size in SIZES:
        config = NLDConfig.preset(size)
        for tp in TENSOR_PARALLEL:
            lines.append(f"| {size} | {tp} | {chunk_workspace_bytes(config, tp, chunk) / MIB:.1f}"
                         f" | {xla_scores_bytes(config, tp, chunk) / GIB:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    args = parser.parse_args()
    print(f"usable memory = {MEMORY_FRACTION} x device memory - {RESERVE_GIB} GiB; "
          f"max_position_embeddings {NLDConfig.preset('8B').max_position_embeddings}\n")
    print(table(args.chunk))


if __name__ == "__main__":
    main()
