"""The PyTorch baseline: transformers' Ministral3ForCausalLM doing AR greedy generation.

The same network as nld_jax (an NLD checkpoint is a Ministral-3 transformer), randomly
initialised at a released shape, generating `--new` tokens greedily after a `--prompt`-token
prompt at batch 1, in each configuration transformers offers for fast decoding:

- dynamic: the default DynamicCache, eager PyTorch;
- static: a preallocated StaticCache, eager (generation_config.disable_compile);
- static+compile: a StaticCache with the forward compiled by torch.compile (mode
  "reduce-overhead": CUDA graphs on a GPU; fullgraph), as transformers' documentation on static
  caches shows; the first call pays the compile. The report counts the graphs dynamo built, so
  a run in which nothing was compiled shows.

Run it next to `examples/benchmark.py` on the same device, with the same shape, and put both in
BENCHMARKS.md. It needs torch and transformers (the GPU image has both; they are never
dependencies of nld_jax):

    python3 benchmarks/torch_ar.py --size 8B --prompt 512 --new 256 --out bench_torch/
    python3 benchmarks/torch_ar.py --config path/config.json --device cpu --new 8   # smoke

Timings are whole generate() calls (prefill included, as in examples/benchmark.py), median of
--repeats after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
import transformers
from transformers import GenerationConfig, Ministral3Config, Ministral3ForCausalLM

CONFIGURATIONS = ("dynamic", "static", "static+compile")


def ministral3_config(nld: dict) -> Ministral3Config:
    """A released NLD config.json (either RoPE spelling) as transformers' Ministral3Config."""
    rope = nld.get("rope_parameters")
    if rope is None:  # the older spelling: top-level rope_theta plus rope_scaling
        rope = {**nld.get("rope_scaling", {}), "rope_theta": nld["rope_theta"]}
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
    return Ministral3Config(
        vocab_size=nld["vocab_size"], hidden_size=nld["hidden_size"],
        intermediate_size=nld["intermediate_size"], num_hidden_layers=nld["num_hidden_layers"],
        num_attention_heads=nld["num_attention_heads"],
        num_key_value_heads=nld["num_key_value_heads"], head_dim=nld["head_dim"],
        hidden_act="silu", max_position_embeddings=nld["max_position_embeddings"],
        rms_norm_eps=nld["rms_norm_eps"], rope_parameters=rope, tie_word_embeddings=False,
        sliding_window=None, pad_token_id=0, attn_implementation="sdpa")


def _nld_config(args: argparse.Namespace) -> dict:
    if args.config:
        return json.loads(pathlib.Path(args.config).read_text())
    from nld_jax.config import NLDConfig  # needs the nld_jax package (and so jax)

    return NLDConfig.preset(args.size).to_hf_dict()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generate(model: Ministral3ForCausalLM, prompt: torch.Tensor, new_tokens: int,
                  configuration: str, repeats: int) -> dict:
    """Seconds of generate() in one configuration: the first call, then the median of repeats."""
    static = configuration != "dynamic"
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=None, pad_token_id=0,
        cache_implementation="static" if static else None,
        disable_compile=True)  # compiled explicitly below, the same way on every device
    model.generation_config.eos_token_id = None  # never stop early: every run makes new_tokens
    eager_forward = model.forward
    if configuration == "static+compile":
        torch._dynamo.reset()
        model.forward = torch.compile(eager_forward, mode="reduce-overhead", fullgraph=True)

    outputs = []

    def run() -> float:
        _synchronize(prompt.device)
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             generation_config=generation)
        _synchronize(prompt.device)
        assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
        outputs.append(out[0, prompt.shape[1]:].tolist())
        return time.perf_counter() - start

    try:
        first = run()
        times = [run() for _ in range(repeats)]
    finally:
        model.forward = eager_forward
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    if configuration == "static+compile" and graphs == 0:
        raise RuntimeError("torch.compile built no graph: the compiled run was not compiled")
    median = statistics.median(times)
    return dict(configuration=configuration, first_call_s=first, median_s=median,
                tokens_per_s=new_tokens / median, ms_per_token=1e3 * median / new_tokens,
                compiled_graphs=graphs if configuration == "static+compile" else 0,
                tokens=outputs[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8B", choices=["3B", "8B", "14B"])
    parser.add_argument("--config", help="an NLD config.json instead of --size")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS),
                        choices=CONFIGURATIONS)
    parser.add_argument("--out", default="bench_torch")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = ministral3_config(_nld_config(args))
    torch.manual_seed(0)
    with device:
        model = Ministral3ForCausalLM(config).to(dtype).eval()
    parameters = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt), device=device)
    results = [time_generate(model, prompt, args.new, configuration, args.repeats)
               for configuration in args.configurations]
    for r in results:  # greedy: every configuration should decode the same tokens
        r["tokens_equal_to_first_configuration"] = sum(
            a == b for a, b in zip(r["tokens"], results[0]["tokens"], strict=True)) / args.new
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else device.type, torch=torch.__version__,
                  transformers=transformers.__version__, parameters=parameters,
                  dtype=args.dtype, prompt=args.prompt, new_tokens=args.new, batch=1,
                  configurations=results)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "torch_ar.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# transformers Ministral3ForCausalLM, AR greedy: {parameters / 1e9:.2f}B "
             f"{args.dtype} on {report['device']}", "",
             f"torch {torch.__version__}, transformers {transformers.__version__}, prompt "
             f"{args.prompt}, {args.new} new tokens, batch 1", "",
             "| configuration | tokens/s | ms/token | first call s | tokens as the first |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | "
              f"{r['first_call_s']:.1f} | {r['tokens_equal_to_first_configuration']:.2f} |"
              for r in results]
    (out_dir / "torch_ar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
