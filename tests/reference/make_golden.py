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
  no-cache argmax loop) and ``ar_tokens_bf16_{i}`` (bfloat16 model, informational);
* ``decode.json``: greedy outputs of the diffusion mode and of linear self-speculation (LinearSpec,
  LoRA draft on/off) for the same three prompts, computed by ``torch_decoding.py`` with the float32
  model as the network (no KV cache: explicit 4D attention masks, see that module).

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
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Ministral3Config, Ministral3ForCausalLM

try:  # run as a script (the documented way): tests/reference is on sys.path
    import torch_decoding as td
except ModuleNotFoundError:  # imported as tests.reference.make_golden
    from tests.reference import torch_decoding as td

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

# decode.json (diffusion / self-speculation goldens).
DECODE_NEW_TOKENS = 24
DECODE_EOS_INDEX = 9  # the second EOS choice: the token the first run emitted at this index
SPEC_BLOCK_SIZES = (4, 8)
CUSTOM_MASK_TOL = 1e-5

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
        # Low diffusion threshold. The softmax over 128 ids is nearly flat on these random models
        # (top-1 p of masked positions about 0.0103 .. 0.0131, median 0.0113), so 0.9 only ever
        # commits the forced top-1. Picked from a 1e-4 grid: a step commits about 3 tokens on
        # average (blocks of B=8 take 1 to 5 steps), and no confidence of any recorded run lies
        # within 2e-5 of it (the README lists the margins).
        "low_threshold": 0.0110,
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
        # Confidences sit lower here (about 0.0099 .. 0.0122, median 0.0107); same criteria: about
        # 3.7 tokens a step (blocks take 1 to 3 steps), no confidence within 6e-6 of it.
        "low_threshold": 0.0105,
        "covers": "GQA 3 q heads per kv head (2 kv heads), head_dim 16 != hidden/heads, "
        "theta 1e9, sharded checkpoint (index.json + 2 files), legacy top-level "
        "`rope_theta` + `rope_scaling` spelling.",
    },
]

NORM_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "norm.weight")


def yarn_fields(case: dict) -> dict:
    """The case's YaRN fields (YARN_FIELDS unless the case names its own)."""
    return case.get("yarn", YARN_FIELDS)


def rope_parameters(case: dict) -> dict:
    return {"rope_type": "yarn", "rope_theta": case["rope_theta"], **yarn_fields(case)}


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
        cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **yarn_fields(case)}
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


def check_yarn_against_spec(case: dict, model: Ministral3ForCausalLM) -> list[float]:
    """The reference's YaRN inverse frequencies equal the formula of spec/model.md.

    Returns the ramp (0: extrapolated frequency, 1: interpolated), rounded for printing.
    """
    d = case["head_dim"]
    theta = case["rope_theta"]
    yarn = yarn_fields(case)
    factor = yarn["factor"]
    orig = yarn["original_max_position_embeddings"]
    j = np.arange(d // 2, dtype=np.float64)
    pos_freqs = theta ** (2.0 * j / d)
    extrap = 1.0 / pos_freqs
    interp = 1.0 / (factor * pos_freqs)

    def corr_dim(r: float) -> float:
        return d * np.log(orig / (2.0 * np.pi * r)) / (2.0 * np.log(theta))

    low = max(int(np.floor(corr_dim(yarn["beta_fast"]))), 0)
    high = min(int(np.ceil(corr_dim(yarn["beta_slow"]))), d - 1)
    ramp = np.clip((j - low) / (high - low), 0.0, 1.0)
    inv_freq = interp * ramp + extrap * (1.0 - ramp)
    got = model.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(got, inv_freq, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == 1.0
    print(f"  yarn: low={low} high={high} ramp={np.round(ramp, 3).tolist()}")
    return np.round(ramp, 3).tolist()


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


# ---------------------------------------------------------------------------------------------
# decode.json: diffusion and self-speculation goldens (torch_decoding.py on the float32 model).
# ---------------------------------------------------------------------------------------------


def sdpa_copy(model: Ministral3ForCausalLM) -> Ministral3ForCausalLM:
    """The same weights with transformers' SDPA attention (accepts a boolean 4D mask)."""
    other = copy.deepcopy(model)
    other.set_attn_implementation("sdpa")
    assert other.config._attn_implementation == "sdpa"
    return other.eval()


@torch.no_grad()
def check_custom_mask(model: Ministral3ForCausalLM, ids: np.ndarray) -> dict:
    """The custom 4D mask path of torch_decoding is honoured and computes what it should.

    1. Causal mask, whole sequence: equals the plain forward (transformers' own causal mask).
    2. Causal mask over prefix + block: the block rows equal the plain forward's rows.
    3. Bidirectional block: equals the SDPA implementation given the same pattern as a BOOLEAN
       [1, 1, T, T] mask (an independent attention kernel and mask convention), and differs from
       the causal result (the mask is not silently ignored).
    4. The draft pass over a cached prefix equals the recompute for the base model.
    """
    seq = [int(t) for t in ids[0, :48]]
    plain = causal_logits(model, np.array([seq]))[0]
    whole = td.forward_logits(model, [], seq, bidirectional=False)
    err_causal = float(np.abs(whole - plain).max())
    assert err_causal < CUSTOM_MASK_TOL, f"custom causal mask != plain forward: {err_causal}"
    prefix, block = seq[:40], seq[40:]
    split = td.forward_logits(model, prefix, block, bidirectional=False)
    err_split = float(np.abs(split - plain[40:]).max())
    assert err_split < CUSTOM_MASK_TOL, f"prefix + causal block != plain forward: {err_split}"

    bidir = td.forward_logits(model, prefix, block, bidirectional=True)
    sdpa = sdpa_copy(model)
    ids_t = torch.tensor([seq], dtype=torch.int64)
    allowed = td.block_mask(len(prefix), len(block), bidirectional=True)[None, None]
    ref = sdpa(
        input_ids=ids_t, attention_mask=allowed, position_ids=torch.arange(len(seq))[None],
        use_cache=False,
    ).logits[0, len(prefix) :].float().numpy()
    err_bidir = float(np.abs(bidir - ref).max())
    assert err_bidir < CUSTOM_MASK_TOL, f"bidirectional eager != sdpa boolean mask: {err_bidir}"
    moved = float(np.abs(bidir - split).max())
    assert moved > 1e-3, f"bidirectional mask had no effect ({moved})"
    # 4. The draft path that reads a KV cache of the prefix (used with an adapter) computes the
    #    same thing as the recompute when the draft model equals the base.
    cached = td.draft_logits(model, copy.deepcopy(model), prefix, block)
    err_cached = float(np.abs(cached - bidir).max())
    assert err_cached < CUSTOM_MASK_TOL, f"cached-prefix draft != recompute: {err_cached}"
    return {"causal": err_causal, "split": err_split, "bidir_vs_sdpa": err_bidir,
            "cached_draft": err_cached}


@torch.no_grad()
def lora_merged(
    model: Ministral3ForCausalLM, case_dir: Path, check_ids: np.ndarray
) -> tuple[Ministral3ForCausalLM, float]:
    """Copy of ``model`` with the draft LoRA merged: o_proj.W + scale * B @ A, in float32.

    The adapter's bf16 tensors are read back from ``linear_spec_lora/`` and upcast. The merged
    model computes ``(W + s B A) x``, the unmerged adapter ``W x + s B (A x)``: the same linear map,
    so they agree up to float32 rounding, which is asserted here against an unmerged forward
    (forward hooks adding ``s * B (A x)`` to every o_proj output of the base model).
    """
    lora_dir = case_dir / "linear_spec_lora"
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["o_proj"]
    scale = cfg["lora_alpha"] / cfg["r"]
    raw = load_file(str(lora_dir / "adapter_model.safetensors"))
    tensors = {k: v.float() for k, v in raw.items()}
    merged = copy.deepcopy(model).eval()
    hooks = []
    for i, layer in enumerate(merged.model.layers):
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        o_proj = layer.self_attn.o_proj
        o_proj.weight.copy_(o_proj.weight + scale * (b @ a))

        def add_lora(_mod, inputs, output, a=a, b=b):
            return output + scale * ((inputs[0] @ a.T) @ b.T)

        hooks.append(model.model.layers[i].self_attn.o_proj.register_forward_hook(add_lora))
    seq = [int(t) for t in check_ids[0, :48]]
    try:
        unmerged = td.forward_logits(model, seq[:40], seq[40:], bidirectional=True)
    finally:
        for h in hooks:
            h.remove()
    got = td.forward_logits(merged, seq[:40], seq[40:], bidirectional=True)
    err = float(np.abs(got - unmerged).max())
    assert err < CUSTOM_MASK_TOL, f"merged LoRA != unmerged adapter: {err}"
    base = td.forward_logits(model, seq[:40], seq[40:], bidirectional=True)
    assert float(np.abs(got - base).max()) > 1e-3, "the LoRA has no effect"
    return merged, err


def absent_id(tokens: list[int]) -> int:
    """The smallest id >= 0 that does not occur in ``tokens``."""
    e = 0
    while e in tokens:
        e += 1
    return e


def decode_one(
    setting: dict,
    eos: int,
    model: Ministral3ForCausalLM,
    draft_lora: Ministral3ForCausalLM | None,
    ar_tokens: np.ndarray,
    margins: td.Margins,
    mask_id_runs: list[str],
) -> dict:
    """One decode.json run: ``setting`` holds every field but the outputs and the EOS id."""
    n, prompt, bk = setting["max_new_tokens"], setting["prompt"], setting["block_size"]
    if setting["mode"] == "diffusion":
        kwargs = {
            "block_size": bk, "threshold": setting["threshold"],
            "steps_per_block": setting["steps_per_block"], "max_new_tokens": n,
            "eos_token_id": eos, "mask_token_id": MASK_ID,
        }
        res = td.diffusion_generate(model, prompt, margins=margins, **kwargs)
        # Masks are tracked by position (a seed or committed token equal to the mask id stays a
        # token). Tracking them by value (x == mask_id) can only differ when the mask id is among
        # the emitted tokens: check that, and list such runs in the README.
        by_value = td.diffusion_generate(model, prompt, mask_by_value=True, **kwargs)
        if by_value != res:
            assert MASK_ID in res.tokens, "mask tracking matters without a mask id"
            if eos >= 0:  # eos -1: the unrecorded first pass
                mask_id_runs.append(
                    f"prompt {setting['prompt_index']}, B={bk}, threshold "
                    f"{setting['threshold']}, S={setting['steps_per_block']}, eos {eos}"
                )
        extra = {"steps_per_block_used": res.steps_per_block_used}
    else:
        draft = draft_lora if setting["lora"] else model
        assert draft is not None
        res = td.self_spec_generate(
            model, draft, prompt, block_size=bk, max_new_tokens=n, eos_token_id=eos,
            mask_token_id=MASK_ID, margins=margins,
        )
        # Temperature 0: LinearSpec emits exactly the greedy AR output.
        ar = td.truncate_after_eos([int(t) for t in ar_tokens[:n]], eos)
        assert res.tokens == ar, f"self-spec != greedy AR: {res.tokens} vs {ar}"
        extra = {"accepted": res.accepted}
    return {
        **setting, "eos_token_id": eos, "tokens": res.tokens,
        "num_forwards": res.num_forwards, **extra,
    }


def decode_runs(
    case: dict,
    model: Ministral3ForCausalLM,
    draft_lora: Ministral3ForCausalLM | None,
    prompts: list[np.ndarray],
    ar_tokens: list[np.ndarray],
    margins: td.Margins,
    mask_id_runs: list[str],
) -> list[dict]:
    """All runs of decode.json for one case (the README written below describes the layout).

    ``mask_id_runs`` receives a description of every recorded diffusion run whose output would
    change if masks were tracked by value (``x == mask_id``) instead of by position.
    """
    low = case["low_threshold"]
    diffusion_cfgs = [(4, 0.9, None), (8, 0.9, None), (4, None, 4), (8, None, 4), (8, low, None)]
    spec_cfgs = [(bk, False) for bk in SPEC_BLOCK_SIZES]
    if draft_lora is not None:
        spec_cfgs += [(bk, True) for bk in SPEC_BLOCK_SIZES]
    modes = [("diffusion", bk, thr, s, False) for bk, thr, s in diffusion_cfgs]
    modes += [("self_spec", bk, None, None, lora) for bk, lora in spec_cfgs]

    runs = []
    for pi, prompt_arr in enumerate(prompts):
        for mode, bk, thr, steps, lora in modes:
            setting = {
                "mode": mode, "prompt_index": pi, "prompt": [int(t) for t in prompt_arr],
                "block_size": bk, "threshold": thr, "steps_per_block": steps, "lora": lora,
                "max_new_tokens": DECODE_NEW_TOKENS,
            }
            args = (model, draft_lora, ar_tokens[pi], margins, mask_id_runs)
            # The config's EOS (11) rarely shows up, so each setting runs twice: with an id its
            # output never contains, then with the token it emitted at DECODE_EOS_INDEX.
            free = decode_one(setting, -1, *args)  # no EOS at all (not recorded)
            first = decode_one(setting, absent_id(free["tokens"]), *args)
            assert {**first, "eos_token_id": -1} == free, "an absent EOS changed the run"
            assert len(first["tokens"]) > DECODE_EOS_INDEX
            second = decode_one(setting, first["tokens"][DECODE_EOS_INDEX], *args)
            first["eos_case"], second["eos_case"] = "absent", f"output_{DECODE_EOS_INDEX}"
            runs += [first, second]
    return runs


def write_decode_json(case_dir: Path, runs: list[dict]) -> None:
    """One run per line (ints only, threshold the single float)."""
    body = ",\n".join("    " + json.dumps(r, separators=(", ", ": ")) for r in runs)
    text = f'{{\n  "mask_token_id": {MASK_ID},\n  "runs": [\n{body}\n  ]\n}}\n'
    assert json.loads(text)["runs"] == runs
    (case_dir / "decode.json").write_text(text)


def decode_summary(runs: list[dict]) -> dict:
    """Typical steps per block / accepted counts and NFE, per kind of run, for the README."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["mode"] == "diffusion":
            kind = (
                f"diffusion B={r['block_size']} threshold {r['threshold']}"
                if r["threshold"] is not None
                else f"diffusion B={r['block_size']} schedule S={r['steps_per_block']}"
            )
        else:
            kind = f"self_spec B={r['block_size']} lora={r['lora']}"
        groups.setdefault(kind, []).append(r)
    out = {}
    for kind, rs in groups.items():
        key = "steps_per_block_used" if rs[0]["mode"] == "diffusion" else "accepted"
        counts = [c for r in rs if r["eos_case"] == "absent" for c in r[key]]
        toks = sum(len(r["tokens"]) for r in rs if r["eos_case"] == "absent")
        nfe = sum(r["num_forwards"] for r in rs if r["eos_case"] == "absent")
        out[kind] = {"key": key, "counts": counts, "tokens_per_forward": toks / nfe}
    return out


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

    stats["mask_check"] = check_custom_mask(model, input_ids)
    print("  custom 4D mask: max|diff| " + ", ".join(
        f"{k} {v:.1e}" for k, v in stats["mask_check"].items()))
    draft = None
    if case["lora"]:
        draft, stats["lora_merge_err"] = lora_merged(model, case_dir, input_ids)
        print(f"  LoRA merged vs unmerged: max|diff| {stats['lora_merge_err']:.1e}")
    margins = td.Margins()
    ar_tokens = [golden[f"ar_tokens_{i}"] for i in range(len(prompts))]
    stats["mask_id_runs"] = []
    runs = decode_runs(case, model, draft, prompts, ar_tokens, margins, stats["mask_id_runs"])
    write_decode_json(case_dir, runs)
    stats["decode_runs"] = len(runs)
    stats["decode_summary"] = decode_summary(runs)
    stats["decode_margins"] = margins
    stats["low_threshold"] = case["low_threshold"]
    print(
        f"  decode.json: {len(runs)} runs; min argmax gap {margins.argmax_gap:.2e}, "
        f"min |p - threshold| {margins.threshold_gap:.2e}, "
        f"min top-k confidence gap {margins.topk_gap:.2e}"
    )
    for desc in stats["mask_id_runs"]:
        print(f"    mask id emitted; by-value mask tracking would differ: {desc}")
    for kind, summ in stats["decode_summary"].items():
        print(f"    {kind}: {summ['key']} {summ['counts']}, "
              f"tokens/forward {summ['tokens_per_forward']:.2f}")
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
        "used by the `lora: true` self-speculation runs of `decode.json`.",
        "",
        "Smallest top-1 minus top-2 logit gap (float32), a guide to how robust argmax checks are:",
    ]
    for s in stats:
        lines.append(
            f"- `{s['name']}`: causal forward {s['min_gap_forward']:.2e}, "
            f"greedy AR steps {s['min_gap_ar']:.2e}"
        )
    lines += decode_readme(stats)
    (OUT_DIR / "README.md").write_text("\n".join(lines) + "\n")


DECODE_README = """
## decode.json: diffusion and linear self-speculation (greedy)

Made by `tests/reference/torch_decoding.py` (spec/decoding.md sections 1-3, temperature 0,
batch 1) with the float32 transformers model as the network, WITHOUT a KV cache: each forward
recomputes [committed prefix + block] under a custom additive [1, 1, T, T] float mask (0 /
float32 min, passed as `attention_mask`: transformers returns a 4D mask unchanged and eager
attention adds it to the scores). Prefix rows are causal; block rows see the prefix and the
block, bidirectionally or causally. Checked: the causal mask reproduces the plain forward (max
|diff| 0); a bidirectional block matches SDPA attention given the same pattern as a boolean
mask (< 1e-5). The LoRA draft model has o_proj W + (alpha/r) B A merged in float32 (the bf16
adapter upcast): the same linear map as the unmerged adapter, equal to it up to float32
rounding (checked < 1e-5 against forward hooks adding s B (A x) to the base model). The LoRA
draft pass alone reads a KV cache: the prefix goes through the base model (the cache a real
decoder reads was written by LoRA-off verify passes) and only the block through the LoRA copy
(checked: with the base as draft this path equals the recompute exactly).

`{"mask_token_id": 100, "runs": [...]}`, one run per line. Run fields: `mode` (`diffusion` |
`self_spec`), `prompt_index` and `prompt` (= `ar_prompt_{i}` of golden.npz), `block_size`,
`threshold` (float; null = even schedule), `steps_per_block` (S of the schedule; null with a
threshold, the step cap then being the block size), `lora` (self_spec: adapter on in the draft
pass; the verify pass never uses it), `max_new_tokens` (24), `eos_token_id`, `tokens` (every
emitted token, the prefill seed first, truncated after the first EOS; self_spec also to
`max_new_tokens`, diffusion not: it runs whole blocks), `num_forwards` (prefill not counted;
diffusion: denoise steps + 1 commit per block run; self_spec: 2 per cycle), then
`steps_per_block_used` (diffusion: the denoise forwards of each block run) or `accepted`
(self_spec: the accepted draft count c of each cycle), and `eos_case` (informational). Every
setting runs twice: `absent`, with `eos_token_id` the smallest id missing from its output (so
nothing stops early), and `output_9`, with the id the `absent` run emitted at index 9
(generation stops at its first occurrence, which may come earlier).

Settings per case and prompt: diffusion (B, threshold, S) = (4, 0.9, -), (8, 0.9, -),
(4, none, 4), (8, none, 4), (8, LOW, -); self_spec B = 4 and 8 with lora false, and with lora
true where the case has an adapter. LOW is per case (below): the softmax over 128 ids is nearly
flat (top-1 p about 0.010 - 0.013), so 0.9 only ever commits the forced top-1, while LOW
commits several tokens a step.

Conventions made explicit: a block whose seed (the previous commit's prediction) is EOS is not
run: the seed is emitted and generation stops; the seed after the last block is not emitted;
masks are tracked by POSITION (x[0], the seed, is never a mask; a committed token equal to the
mask id stays committed); the threshold test is in float32 (`p >= float32(threshold)`); ties
go to the lowest position. Asserted for every self_spec run (LoRA or not): output == greedy AR
(`ar_tokens_{i}` cut to 24 tokens and after the first EOS).

Margins over every decision of the recorded runs (float32; run the JAX side at full float32
matmul precision): argmax = smallest top-1 minus top-2 logit gap at every argmax used;
threshold = smallest |p - threshold| of a masked position; top-k = smallest confidence gap
between the k-th chosen and the first unchosen position of a schedule step.
"""

DECODE_README_TAIL = """
The random models' drafts almost never match the AR token, so self_spec accepts 0 (rarely 1)
drafts a cycle: these goldens pin the cycle, rollback and bonus-token logic, not long
acceptances.
"""


def decode_readme(stats: list[dict]) -> list[str]:
    """The decode.json part of the README."""
    lines = DECODE_README.rstrip("\n").split("\n")
    for s in stats:
        m = s["decode_margins"]
        lines.append(
            f"- `{s['name']}`: {s['decode_runs']} runs, LOW = {s['low_threshold']}; "
            f"argmax {m.argmax_gap:.2e}, threshold {m.threshold_gap:.2e}, top-k {m.topk_gap:.2e}"
        )
    lines += ["", "Steps per block / accepted counts of the `absent`-EOS runs (all prompts):"]
    for s in stats:
        for kind, summ in s["decode_summary"].items():
            counts = summ["counts"]
            hist = ", ".join(f"{v}: {counts.count(v)}" for v in sorted(set(counts)))
            lines.append(
                f"- `{s['name']}` {kind}: {summ['key']} {{{hist}}}, "
                f"tokens per forward {summ['tokens_per_forward']:.2f}"
            )
    lines += DECODE_README_TAIL.rstrip("\n").split("\n")
    mask_runs = [(s["name"], d) for s in stats for d in s["mask_id_runs"]]
    if mask_runs:
        lines += [
            "",
            f"Runs that emit the mask id {MASK_ID} (the model predicts it) and would change if",
            "masks were tracked by value (`x == mask_id`) instead of by position:",
        ]
        lines += [f"- `{name}` {desc}" for name, desc in mask_runs]
    return lines


def start_fresh(out_dir: Path) -> None:
    """Deterministic single-thread torch, and an empty output directory."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def main() -> None:
    start_fresh(OUT_DIR)
    stats = [run_case(case) for case in CASES]
    write_readme(stats)

    total = sum(p.stat().st_size for p in FIXTURES_DIR.rglob("*") if p.is_file())
    golden = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"golden fixtures: {golden} bytes; all of tests/fixtures: {total} bytes")
    assert total < MAX_FIXTURE_BYTES, f"tests/fixtures is {total} bytes (limit {MAX_FIXTURE_BYTES})"


if __name__ == "__main__":
    main()
