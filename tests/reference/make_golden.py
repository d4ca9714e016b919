"""Generate the external-oracle golden fixtures under ``tests/fixtures/golden/``.

The oracle is transformers' ``Ministral3ForCausalLM`` (eager attention, CPU), which computes the
Nemotron-Labs-Diffusion network of ``spec/model.md``. Each case builds a tiny randomly initialised
model (fixed seeds), writes it in the RELEASED NLD layout (``config.json`` with
``model_type="nemotron_labs_diffusion"``, bf16 safetensors named ``encoder.*`` /
``diffusion_head.weight``) and stores reference outputs in ``golden.npz``:

* ``input_ids`` int32 [2, 80] and the causal-forward logits in float32 (``logits_f32``) and with
  the model cast to bfloat16 (``logits_bf16``, upcast to float32), both [2, 80, V];
* greedy AR continuations with the KV cache (``model.generate``), 48 new tokens for three prompts
  of lengths 5, 17 and 40: ``ar_prompt_{i}``, ``ar_tokens_{i}`` (float32 model; checked against a
  no-cache argmax loop) and ``ar_tokens_bf16_{i}`` (bfloat16 model, informational).

Every parameter is rounded to bfloat16 before the float32 reference runs, so the bf16 checkpoint
holds exactly the values the float32 reference used.

Run from the repository root with the interpreter that has torch and transformers::

    pip install torch==2.13.0 transformers   # transformers >= 5.0 (made with 5.23.0)
    python3 tests/reference/make_golden.py

The output directory is deleted and rewritten from scratch on every run.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, Ministral3Config, Ministral3ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "golden"
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
MAX_FIXTURE_BYTES = 3 * 1024 * 1024

BATCH = 2
SEQ_LEN = 80  # > 2 * original_max_position_embeddings: YaRN + Llama-4 scaling both active
AR_PROMPT_LENS = (5, 17, 40)
AR_NEW_TOKENS = 48

# Released NLD special ids / diffusion fields (spec/model.md).
BOS_ID = 1
EOS_ID = 11
MASK_ID = 100
BLOCK_SIZE = 32

YARN_FIELDS = {
    "factor": 16.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}

LORA_RANK = 8
LORA_ALPHA = 32
LORA_STD = 0.05
PARAM_STD = 0.02
# Larger q/k weights make attention peaked, so that RoPE, YaRN and the Llama-4 query scaling move
# the logits well above the float32 tolerance (with 0.02 attention is nearly uniform).
QK_STD = 0.25
NORM_STD = 0.1

CASES = [
    {
        "name": "gqa4_theta1e6",
        "seed": 1001,
        "vocab_size": 128,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 96,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 512,
        "sharded": False,
        "legacy_rope_spelling": False,
        "lora": True,
        "covers": "GQA 4 q heads per kv head (single kv head), head_dim 32 != hidden/heads, "
        "theta 1e6, single-file checkpoint, `rope_parameters` spelling, LoRA adapter dir.",
    },
    {
        "name": "gqa3_theta1e9_sharded",
        "seed": 2002,
        "vocab_size": 128,
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 80,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e9,
        "max_position_embeddings": 512,
        "sharded": True,
        "legacy_rope_spelling": True,
        "lora": False,
        "covers": "GQA 3 q heads per kv head (2 kv heads), head_dim 16 != hidden/heads, "
        "theta 1e9, sharded checkpoint (index.json + 2 files), legacy top-level "
        "`rope_theta` + `rope_scaling` spelling.",
    },
]

NORM_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "norm.weight")


def rope_parameters(case: dict) -> dict:
    return {"rope_type": "yarn", "rope_theta": case["rope_theta"], **YARN_FIELDS}


def hf_config(case: dict) -> Ministral3Config:
    """transformers config of the reference model (new `rope_parameters` spelling)."""
    return Ministral3Config(
        vocab_size=case["vocab_size"],
        hidden_size=case["hidden_size"],
        intermediate_size=case["intermediate_size"],
        num_hidden_layers=case["num_hidden_layers"],
        num_attention_heads=case["num_attention_heads"],
        num_key_value_heads=case["num_key_value_heads"],
        head_dim=case["head_dim"],
        hidden_act="silu",
        max_position_embeddings=case["max_position_embeddings"],
        rms_norm_eps=case["rms_norm_eps"],
        rope_parameters=rope_parameters(case),
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        attn_implementation="eager",
    )


def nld_config(case: dict) -> dict:
    """config.json in the released Nemotron-Labs-Diffusion style."""
    cfg = {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "hidden_act": "silu",
        "rms_norm_eps": case["rms_norm_eps"],
        "vocab_size": case["vocab_size"],
        "hidden_size": case["hidden_size"],
        "intermediate_size": case["intermediate_size"],
        "num_hidden_layers": case["num_hidden_layers"],
        "num_attention_heads": case["num_attention_heads"],
        "num_key_value_heads": case["num_key_value_heads"],
        "head_dim": case["head_dim"],
        "max_position_embeddings": case["max_position_embeddings"],
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "mask_token_id": MASK_ID,
        "block_size": BLOCK_SIZE,
        "dlm_paradigm": "bidirectional",
        "torch_dtype": "bfloat16",
        "sliding_window": None,
    }
    if case["legacy_rope_spelling"]:
        cfg["rope_theta"] = case["rope_theta"]
        cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **YARN_FIELDS}
    else:
        cfg["rope_parameters"] = rope_parameters(case)
    return cfg


def check_legacy_spelling(case: dict, model: Ministral3ForCausalLM) -> None:
    """transformers reads the legacy spelling into the same inverse frequencies."""
    cfg = nld_config(case)
    legacy = Ministral3Config(
        vocab_size=case["vocab_size"],
        hidden_size=case["hidden_size"],
        intermediate_size=case["intermediate_size"],
        num_hidden_layers=1,
        num_attention_heads=case["num_attention_heads"],
        num_key_value_heads=case["num_key_value_heads"],
        head_dim=case["head_dim"],
        max_position_embeddings=case["max_position_embeddings"],
        rope_theta=cfg["rope_theta"],
        rope_scaling=dict(cfg["rope_scaling"]),
        tie_word_embeddings=False,
    )
    inv_legacy = Ministral3ForCausalLM(legacy).model.rotary_emb.inv_freq
    assert torch.equal(inv_legacy, model.model.rotary_emb.inv_freq), "legacy rope spelling differs"


def check_yarn_against_spec(case: dict, model: Ministral3ForCausalLM) -> None:
    """The reference's YaRN inverse frequencies equal the formula of spec/model.md."""
    d = case["head_dim"]
    theta = case["rope_theta"]
    factor = YARN_FIELDS["factor"]
    orig = YARN_FIELDS["original_max_position_embeddings"]
    j = np.arange(d // 2, dtype=np.float64)
    pos_freqs = theta ** (2.0 * j / d)
    extrap = 1.0 / pos_freqs
    interp = 1.0 / (factor * pos_freqs)

    def corr_dim(r: float) -> float:
        return d * np.log(orig / (2.0 * np.pi * r)) / (2.0 * np.log(theta))

    low = max(int(np.floor(corr_dim(YARN_FIELDS["beta_fast"]))), 0)
    high = min(int(np.ceil(corr_dim(YARN_FIELDS["beta_slow"]))), d - 1)
    ramp = np.clip((j - low) / (high - low), 0.0, 1.0)
    inv_freq = interp * ramp + extrap * (1.0 - ramp)
    got = model.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(got, inv_freq, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == 1.0
    print(f"  yarn: low={low} high={high} ramp={np.round(ramp, 3).tolist()}")


def init_params(model: Ministral3ForCausalLM, seed: int) -> None:
    """normal(0, 0.02) (q/k: 0.25), 1 + 0.1 * normal for RMSNorm weights; round to bf16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            is_norm = name.endswith(NORM_SUFFIXES)
            std = QK_STD if name.endswith(("q_proj.weight", "k_proj.weight")) else PARAM_STD
            value = 1.0 + NORM_STD * noise if is_norm else std * noise
            param.copy_(value.to(torch.bfloat16).to(torch.float32))


def nld_state_dict(model: Ministral3ForCausalLM) -> dict[str, torch.Tensor]:
    """bf16 tensors in the released layout: model. -> encoder., lm_head. -> diffusion_head."""
    out = {}
    for name, param in model.named_parameters():
        if name.startswith("model."):
            new = "encoder." + name[len("model.") :]
        elif name.startswith("lm_head."):
            new = "diffusion_head." + name[len("lm_head.") :]
        else:
            raise ValueError(f"unexpected parameter {name}")
        out[new] = param.detach().to(torch.bfloat16).contiguous().clone()
    return out


def write_weights(case_dir: Path, case: dict, tensors: dict[str, torch.Tensor]) -> None:
    n_layers = case["num_hidden_layers"]
    assert len(tensors) == 9 * n_layers + 3, len(tensors)
    meta = {"format": "pt"}
    if not case["sharded"]:
        save_file(tensors, str(case_dir / "model.safetensors"), metadata=meta)
        return
    split = (n_layers + 1) // 2  # layers [0, split) in shard 1, the rest in shard 2

    def shard_of(name: str) -> int:
        if name == "encoder.embed_tokens.weight":
            return 1
        if name.startswith("encoder.layers."):
            return 1 if int(name.split(".")[2]) < split else 2
        return 2  # encoder.norm.weight, diffusion_head.weight

    files = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    weight_map = {}
    for k in (1, 2):
        part = {n: t for n, t in tensors.items() if shard_of(n) == k}
        save_file(part, str(case_dir / files[k]), metadata=meta)
        weight_map.update({n: files[k] for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (case_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_lora(case_dir: Path, case: dict, seed: int) -> None:
    lora_dir = case_dir / "linear_spec_lora"
    lora_dir.mkdir()
    adapter_config = {
        "peft_type": "LORA",
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "target_modules": ["o_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": "",
        "task_type": "CAUSAL_LM",
    }
    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    qdim = case["num_attention_heads"] * case["head_dim"]
    tensors = {}
    for i in range(case["num_hidden_layers"]):
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        a = LORA_STD * torch.randn((LORA_RANK, qdim), generator=gen)
        b = LORA_STD * torch.randn((case["hidden_size"], LORA_RANK), generator=gen)
        tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    save_file(tensors, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def to_bf16(model: Ministral3ForCausalLM) -> Ministral3ForCausalLM:
    """bf16 copy of the model, keeping the RoPE inverse frequencies in float32.

    ``model.to(torch.bfloat16)`` also rounds the non-persistent ``inv_freq`` buffers to bf16, which
    ``from_pretrained(..., dtype=torch.bfloat16)`` does not do (it keeps them float32) and which the
    spec does not do (cos/sin computed in float32). Restore them so the bf16 reference is what a
    user loading the bf16 checkpoint gets.
    """
    inv = model.model.rotary_emb.inv_freq.detach().clone()
    orig = model.model.rotary_emb.original_inv_freq.detach().clone()
    bf = copy.deepcopy(model).to(torch.bfloat16)
    bf.model.rotary_emb.inv_freq = inv
    bf.model.rotary_emb.original_inv_freq = orig
    assert bf.model.rotary_emb.inv_freq.dtype == torch.float32
    return bf.eval()


@torch.no_grad()
def causal_logits(model: Ministral3ForCausalLM, ids: np.ndarray) -> np.ndarray:
    ids_t = torch.from_numpy(ids.astype(np.int64))
    pos = torch.arange(ids_t.shape[1]).unsqueeze(0).expand(ids_t.shape[0], -1)
    out = model(input_ids=ids_t, position_ids=pos, use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def greedy_generate(
    model: Ministral3ForCausalLM, prompt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """KV-cached greedy decoding via generate(); returns new tokens [N] and step logits [N, V].

    Generation must never stop early. An ``eos_token_id=None`` in the GenerationConfig passed to
    generate() is NOT enough: transformers treats None as "unset" and fills it from
    ``model.generation_config`` (which carries the config's eos id 11). So the model's default is
    cleared AND the passed eos id is ``vocab_size``, an id with no logit row, which greedy decoding
    can never emit (no min_new_tokens: its processor would alter the logits).
    """
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=AR_NEW_TOKENS,
        eos_token_id=model.config.vocab_size,
        pad_token_id=0,
        bos_token_id=BOS_ID,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    ids_t = torch.from_numpy(prompt.astype(np.int64))[None]
    out = model.generate(
        input_ids=ids_t, attention_mask=torch.ones_like(ids_t), generation_config=gen_cfg
    )
    new = out.sequences[0, ids_t.shape[1] :].numpy()
    assert new.shape == (AR_NEW_TOKENS,), f"generation stopped early: {new.shape}"
    logits = torch.stack([step[0] for step in out.logits]).float().numpy()
    return new, logits


@torch.no_grad()
def greedy_manual(
    model: Ministral3ForCausalLM, prompt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """No-cache greedy loop: a full causal forward per step, argmax of the last position."""
    seq = prompt.astype(np.int64)
    toks, step_logits = [], []
    for _ in range(AR_NEW_TOKENS):
        last = causal_logits(model, seq[None])[0, -1]
        nxt = int(np.argmax(last))
        toks.append(nxt)
        step_logits.append(last)
        seq = np.append(seq, nxt)
    return np.array(toks, dtype=np.int64), np.stack(step_logits)


def top2_gap(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)
    return part[..., -1] - part[..., -2]


def run_case(case: dict) -> dict:
    name = case["name"]
    print(f"[{name}]")
    case_dir = OUT_DIR / name
    case_dir.mkdir(parents=True)
    seed = case["seed"]

    model = Ministral3ForCausalLM(hf_config(case)).eval()
    assert model.config._attn_implementation == "eager"
    init_params(model, seed)
    check_yarn_against_spec(case, model)
    if case["legacy_rope_spelling"]:
        check_legacy_spelling(case, model)

    (case_dir / "config.json").write_text(json.dumps(nld_config(case), indent=2) + "\n")
    write_weights(case_dir, case, nld_state_dict(model))
    if case["lora"]:
        write_lora(case_dir, case, seed + 7)

    rng = np.random.default_rng(seed)
    vocab = case["vocab_size"]
    input_ids = rng.integers(0, vocab, size=(BATCH, SEQ_LEN)).astype(np.int32)
    prompts = [rng.integers(0, vocab, size=(n,)).astype(np.int32) for n in AR_PROMPT_LENS]

    model_bf16 = to_bf16(model)
    golden: dict[str, np.ndarray] = {"input_ids": input_ids}
    golden["logits_f32"] = causal_logits(model, input_ids).astype(np.float32)
    golden["logits_bf16"] = causal_logits(model_bf16, input_ids).astype(np.float32)
    diff = np.abs(golden["logits_f32"] - golden["logits_bf16"]).max()
    argmax_agree = (golden["logits_f32"].argmax(-1) == golden["logits_bf16"].argmax(-1)).mean()
    print(
        f"  logits std {golden['logits_f32'].std():.4f}, max|f32-bf16| {diff:.2e}, "
        f"argmax agreement {argmax_agree:.3f}"
    )

    stats = {"name": name, "min_gap_forward": float(top2_gap(golden["logits_f32"]).min())}
    gaps, bf16_match = [], []
    for i, prompt in enumerate(prompts):
        toks, gen_logits = greedy_generate(model, prompt)
        ref_toks, ref_logits = greedy_manual(model, prompt)
        assert np.array_equal(toks, ref_toks), f"prompt {i}: cached generate != no-cache loop"
        np.testing.assert_allclose(gen_logits, ref_logits, rtol=0, atol=1e-4)
        gaps.append(float(top2_gap(ref_logits).min()))
        toks_bf16, _ = greedy_generate(model_bf16, prompt)
        bf16_match.append(int(np.argmax(toks != toks_bf16)) if (toks != toks_bf16).any() else -1)
        golden[f"ar_prompt_{i}"] = prompt
        golden[f"ar_tokens_{i}"] = toks.astype(np.int32)
        golden[f"ar_tokens_bf16_{i}"] = toks_bf16.astype(np.int32)
        print(
            f"  AR prompt {i} (len {len(prompt)}): min top-2 gap {gaps[-1]:.2e}, "
            f"bf16 first divergence {bf16_match[-1]} (-1 = none), "
            f"contains id {EOS_ID}: {bool((toks == EOS_ID).any())}"
        )
    stats["min_gap_ar"] = min(gaps)
    stats["bf16_divergence"] = bf16_match
    np.savez_compressed(case_dir / "golden.npz", **golden)
    return stats


def write_readme(stats: list[dict]) -> None:
    lines = [
        "# Golden fixtures (external oracle)",
        "",
        "Generated by `python3 tests/reference/make_golden.py` (do not edit by hand; the script",
        "deletes and rewrites this directory).",
        f"Oracle: transformers {transformers.__version__} `Ministral3ForCausalLM` on torch",
        f"{torch.__version__} (eager attention, CPU, 1 thread), tiny random models (normal std",
        "0.02, q/k projections 0.25; RMSNorm weights 1 + 0.1*normal; every parameter rounded to",
        "bf16 first).",
        "Each case holds the RELEASED NLD layout: `config.json` (model_type",
        "`nemotron_labs_diffusion`), bf16 safetensors named `encoder.*` / `diffusion_head.weight`.",
        "YaRN: factor 16, original_max_position_embeddings 32 (so the 80-token inputs cross the",
        "Llama-4 query-scaling steps at positions 32 and 64), beta_fast 32, beta_slow 1,",
        "mscale = mscale_all_dim = 1, llama_4_scaling_beta 0.1, max_position_embeddings 512.",
        "",
        "Cases:",
    ]
    for case in CASES:
        lines.append(f"- `{case['name']}`: {case['covers']}")
    lines.append("")
    lines.append("Every case: RMSNorm eps 1e-5, vocab 128, no biases, untied head.")
    lines += [
        "",
        "`golden.npz` keys: `input_ids` int32 [2, 80]; `logits_f32`, `logits_bf16` float32",
        "[2, 80, V] (causal forward, positions 0..79; bf16 = model cast to bf16 with the RoPE",
        "inv_freq kept in float32, as `from_pretrained(dtype=bfloat16)` does); `ar_prompt_{0,1,2}`",
        "int32 (lengths 5, 17, 40); `ar_tokens_{0,1,2}` int32 [48]: greedy new tokens of the",
        "float32 model with the KV cache (no EOS stop; equal to a no-cache argmax loop);",
        "`ar_tokens_bf16_{0,1,2}` int32 [48]: same with the bf16 model (informational).",
        "`linear_spec_lora/` (first case): PEFT LoRA on o_proj, r 8, alpha 32, std 0.05, bf16;",
        "no golden output uses it yet.",
        "",
        "Smallest top-1 minus top-2 logit gap (float32), a guide to how robust argmax checks are:",
    ]
    for s in stats:
        lines.append(
            f"- `{s['name']}`: causal forward {s['min_gap_forward']:.2e}, "
            f"greedy AR steps {s['min_gap_ar']:.2e}"
        )
    (OUT_DIR / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    stats = [run_case(case) for case in CASES]
    write_readme(stats)

    total = sum(p.stat().st_size for p in FIXTURES_DIR.rglob("*") if p.is_file())
    golden = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"golden fixtures: {golden} bytes; all of tests/fixtures: {total} bytes")
    assert total < MAX_FIXTURE_BYTES, f"tests/fixtures is {total} bytes (limit {MAX_FIXTURE_BYTES})"


if __name__ == "__main__":
    main()
