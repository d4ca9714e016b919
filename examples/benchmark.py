"""Benchmark nld_jax on a randomly initialised model of a released shape (no download).

    python examples/benchmark.py                       # CPU: the tiny shape, a few seconds
    python examples/benchmark.py --size 8B --prompt 512 --new 256 --out bench/   # on a GPU

Reports, measured in one run on one device:
- per mode (ar, diffusion, self_spec, self_spec_quadratic; --modes): whole-loop tokens/s and
  forwards/s (batch 1), compile s;
- ms per forward for T=1 and T=32 against a cache of the prompt, and their ratio;
- the fraction of the HBM roofline: bytes one forward must read (all weights + the valid KV
  cache) over the device's measured copy bandwidth, divided by the measured forward time;
- each Pallas kernel against its XLA reference, where the kernels run (a Hopper GPU).
Writes benchmark.json and benchmark.md into --out.

Random weights decode nothing meaningful, so self_spec accepts few drafts and diffusion commits
about one token per step here: the per-forward figures are the meaningful ones, and the
projection to published acceptance rates is in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nld_jax
from nld_jax.cache import KVCache
from nld_jax.generate import MODES
from nld_jax.kernels import Kernels, on_hopper
from nld_jax.model import NLDModel


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn() (blocked until ready), after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)
    return 2 * x.nbytes / _time(lambda: copy(x), repeats)


def build(size: str, dtype: str) -> NLDModel:
    config = nld_jax.NLDConfig.preset(size)
    if size == "tiny":
        config = dataclasses.replace(config, vocab_size=1024, hidden_size=256, head_dim=64,
                                     num_attention_heads=8, num_key_value_heads=2,
                                     intermediate_size=768, num_hidden_layers=4,
                                     mask_token_id=100, block_size=32)
    config = dataclasses.replace(config, block_size=32)
    # Built under jit so the weights are created on the device, not copied from the host.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NLDModel(config, dtype=dtype,
                                                                rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(NLDModel(config, dtype=dtype, rngs=nnx.Rngs(0)))[1])()
    return nnx.merge(graphdef, state)


def forward_ms(model: NLDModel, prompt: int, tokens: int, repeats: int) -> float:
    """Milliseconds of one cached forward of `tokens` tokens after `prompt` cached ones."""
    c = model.config
    capacity = -(-(prompt + tokens) // 64) * 64
    cache = KVCache.empty(num_layers=c.num_hidden_layers, batch=1, capacity=capacity,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          dtype=model.dtype).with_lengths(jnp.array([prompt]))
    graphdef, state = nnx.split(model)
    kernel = Kernels.choose(model.attention_impl, config=c, dtype=model.dtype,
                            capacity=capacity, block_size=None).attention

    @jax.jit
    def step(state, cache, block):
        model = nnx.merge(graphdef, state)
        hidden, block_kv = model.forward(block, cache, causal=True, attention_kernel=kernel)
        return model.logits(hidden), cache.write(block_kv, cache.lengths)

    block = jnp.ones((1, tokens), jnp.int32)
    return 1e3 * _time(lambda: step(state, cache, block), repeats)


def bytes_per_forward(model: NLDModel, context: int) -> int:
    """All weights plus the K and V of `context` cached tokens, each read once."""
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    c = model.config
    kv = 2 * c.num_hidden_layers * context * c.num_key_value_heads * c.head_dim
    return params + kv * jnp.dtype(model.dtype).itemsize


def kernel_timings(repeats: int) -> list[dict]:
    """Each Pallas kernel against its XLA reference at the 8B decode shapes."""
    from pallas_kernels.block_attention import block_attention
    from pallas_kernels.block_attention_ref import block_attention_ref
    from pallas_kernels.block_step import confidence_commit, verify_accept
    from pallas_kernels.block_step_ref import confidence_commit_ref, verify_accept_ref

    rows = []
    key = jax.random.key(0)
    for tokens, slots in ((1, 8192), (32, 8192), (32, 1024)):
        q = jax.random.normal(key, (1, tokens, 32, 128), jnp.bfloat16)
        kv = jax.random.normal(key, (1, 1, slots, 8, 128), jnp.bfloat16)  # [L, B, S, K, H]
        own = jax.random.normal(key, (1, tokens, 8, 128), jnp.bfloat16)
        lengths = jnp.array([slots - 64])
        args = (q, kv, kv, lengths, own, own, True)
        kernel = _time(lambda a=args: jax.jit(block_attention)(*a), repeats)
        reference = _time(lambda a=args: jax.jit(block_attention_ref)(*a), repeats)
        rows.append(dict(kernel=f"block_attention T={tokens} S={slots}",
                         kernel_ms=kernel * 1e3, xla_ms=reference * 1e3))
    logits = jax.random.normal(key, (1, 32, 131072), jnp.float32)
    tokens = jnp.zeros((1, 32), jnp.int32)
    masked = jnp.ones((1, 32), bool)
    for name, fn, ref, args in (
            ("confidence_commit T=32", confidence_commit, confidence_commit_ref,
             (logits, tokens, masked, 0.9)),
            ("verify_accept T=32", verify_accept, verify_accept_ref, (logits, tokens))):
        rows.append(dict(kernel=name,
                         kernel_ms=1e3 * _time(lambda f=fn, a=args: jax.jit(f)(*a), repeats),
                         xla_ms=1e3 * _time(lambda f=ref, a=args: jax.jit(f)(*a), repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "3B", "8B", "14B"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"])
    parser.add_argument("--out", default="benchmark_out")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="decoding modes to time (default: all)")
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    device = jax.devices()[0]
    model = build(args.size, args.dtype)
    model.attention_impl = args.attention
    bandwidth = copy_bandwidth(256 * 2**20 if device.platform == "gpu" else 64 * 2**20,
                               args.repeats)
    result: dict = dict(device=device.device_kind, platform=device.platform,
                        jax=jax.__version__, size=args.size, dtype=args.dtype,
                        prompt=args.prompt, new_tokens=args.new, attention=args.attention,
                        hopper_kernels=on_hopper(), copy_bandwidth_gb_s=bandwidth / 1e9,
                        parameters=model.config.num_parameters if args.size != "tiny" else
                        sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    for tokens in (1, 32):
        ms = forward_ms(model, args.prompt, tokens, args.repeats)
        ideal = bytes_per_forward(model, args.prompt) / bandwidth * 1e3
        result[f"forward_ms_T{tokens}"] = ms
        result[f"roofline_fraction_T{tokens}"] = ideal / ms
    result["forward_ratio_T32_over_T1"] = result["forward_ms_T32"] / result["forward_ms_T1"]

    prompt = [list(range(1, args.prompt + 1))]
    modes = []
    for mode in args.modes:
        kwargs = dict(mode=mode, max_new_tokens=args.new, eos_token_ids=[0])
        start = time.perf_counter()
        nld_jax.generate(model, prompt, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = nld_jax.generate(model, prompt, **kwargs)
        seconds = time.perf_counter() - start
        modes.append(dict(mode=mode, tokens=len(out.tokens[0]), forwards=out.num_forwards,
                          tokens_per_s=len(out.tokens[0]) / seconds,
                          forwards_per_s=out.num_forwards / seconds,
                          ms_per_forward=1e3 * seconds / max(out.num_forwards, 1),
                          compile_s=first - seconds,
                          tokens_per_forward=out.stats["tokens_per_forward"]))
    result["modes"] = modes
    result["kernels"] = kernel_timings(args.repeats) if on_hopper() else []

    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# nld_jax benchmark: {args.size} {args.dtype} on {result['device']}",
             "", f"jax {result['jax']}, prompt {args.prompt}, {args.new} new tokens, batch 1, "
             f"attention {args.attention} (Hopper kernels: {result['hopper_kernels']}), copy "
             f"bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s", "",
             "| mode | tokens/s | forwards/s | ms/forward | tokens/forward | compile s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m['mode']} | {m['tokens_per_s']:.1f} | {m['forwards_per_s']:.1f} | "
              f"{m['ms_per_forward']:.2f} | {m['tokens_per_forward']:.2f} | "
              f"{m['compile_s']:.1f} |" for m in modes]
    lines += ["", "| forward | ms | fraction of HBM roofline |", "|---|---|---|"]
    lines += [f"| T={t} | {result[f'forward_ms_T{t}']:.2f} | "
              f"{result[f'roofline_fraction_T{t}']:.2f} |" for t in (1, 32)]
    lines += ["", f"T=32 / T=1 forward time: {result['forward_ratio_T32_over_T1']:.2f}"]
    if result["kernels"]:
        lines += ["", "| kernel | Pallas ms | XLA ms | speed-up |", "|---|---|---|---|"]
        lines += [f"| {k['kernel']} | {k['kernel_ms']:.3f} | {k['xla_ms']:.3f} | "
                  f"{k['xla_ms'] / k['kernel_ms']:.2f} |" for k in result["kernels"]]
    else:
        lines += ["", "Kernel timings: not run (no Hopper GPU on this device)."]
    (out_dir / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
