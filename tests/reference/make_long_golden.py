"""Generate the long-context golden fixture under ``tests/fixtures/long_context/``.

The oracle is transformers' ``Ministral3ForCausalLM`` (eager attention, CPU, float32), as for
``make_golden.py``, whose helpers this script reuses. One tiny random model whose
``original_max_position_embeddings`` is 32 and ``max_position_embeddings`` 256, so a 200-token
prompt and its continuation cross seven Llama-4 query-scaling steps (positions 32, 64, .., 224)
with YaRN's interpolated frequencies throughout. Stored in ``golden.npz``:

* ``input_ids`` int32 [1, 256] and ``logits_f32`` float32 [1, 256, V]: the causal forward over
  every position up to the config's limit (no cache). The script checks that transformers' own
  KV-cached path (a 200-token prefill, then blocks of 8) gives the same logits.
* ``prompt`` int32 [200] (= ``input_ids[0, :200]``), ``eos_token_id`` (an id the runs never emit,
  so nothing stops early), ``ar_tokens`` int32 [56]: greedy AR with transformers' KV cache
  (``generate``), checked against a no-cache argmax loop; prompt + new = 256, the whole context.
  ``self_spec_tokens`` [56]: greedy linear self-speculation (B = 8, no adapter) of
  ``torch_decoding.py``, asserted equal to ``ar_tokens``.
* ``diffusion_tokens`` int32 [56], ``diffusion_forwards`` and ``diffusion_steps`` int32 [7]:
  greedy block diffusion (B = 8, threshold 0.9) of ``torch_decoding.py`` over the same prompt.

Run from the repository root with the interpreter that has torch and transformers::

    python3 tests/reference/make_long_golden.py
"""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers
from transformers import Ministral3ForCausalLM

try:  # run as a script (the documented way): tests/reference is on sys.path
    import make_golden as mg
    import torch_decoding as td
except ModuleNotFoundError:  # imported as tests.reference.make_long_golden
    from tests.reference import make_golden as mg
    from tests.reference import torch_decoding as td

OUT_DIR = mg.FIXTURES_DIR / "long_context"
SEQ_LEN = 256  # = max_position_embeddings: the forward covers every position the config allows
PROMPT_LEN = 200
NEW_TOKENS = SEQ_LEN - PROMPT_LEN
CACHED_BLOCK = 8  # transformers' cached check: blocks of this many tokens after the prefill
BLOCK_SIZE = 8  # diffusion / self-speculation block
THRESHOLD = 0.9
CACHE_TOL = 1e-4  # max |cached - no-cache| logits of the oracle (float32 reordering)

CASE = {
    "name": "long_context",
    "seed": 3003,
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e4,
    "max_position_embeddings": SEQ_LEN,
    "sharded": False,
    "legacy_rope_spelling": False,
    # The released beta_fast 32 / beta_slow 1 put YaRN's whole ramp below dimension 2 when the
    # original window is 32 tokens; 2 / 0.25 (with theta 1e4, head_dim 32) give a ramp from
    # dimension 1 to 6, so the blend of interpolated and extrapolated frequencies is exercised.
    # factor 8 = 256 / 32, the ratio transformers expects of max / original positions.
    "yarn": {
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 2.0,
        "beta_slow": 0.25,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
}


@torch.no_grad()
def cached_logits(model: Ministral3ForCausalLM, ids: np.ndarray) -> np.ndarray:
    """Causal logits through transformers' KV cache: prefill PROMPT_LEN, then blocks."""
    ids_t = torch.from_numpy(ids.astype(np.int64))
    out = model(input_ids=ids_t[:, :PROMPT_LEN], position_ids=torch.arange(PROMPT_LEN)[None],
                use_cache=True)
    cache, pieces = out.past_key_values, [out.logits]
    for start in range(PROMPT_LEN, ids.shape[1], CACHED_BLOCK):
        stop = min(start + CACHED_BLOCK, ids.shape[1])
        out = model(input_ids=ids_t[:, start:stop], position_ids=torch.arange(start, stop)[None],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1).float().numpy()


@torch.no_grad()
def greedy_cached(model: Ministral3ForCausalLM, prompt: np.ndarray, eos: int) -> np.ndarray:
    """transformers generate() with its KV cache, NEW_TOKENS greedy tokens, no early stop."""
    model.generation_config.eos_token_id = None
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                                        eos_token_id=eos, pad_token_id=0, use_cache=True)
    ids_t = torch.from_numpy(prompt.astype(np.int64))[None]
    out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                         generation_config=cfg)
    new = out[0, ids_t.shape[1]:].numpy()
    assert new.shape == (NEW_TOKENS,), f"generation stopped early: {new.shape}"
    return new


def main() -> None:
    mg.start_fresh(OUT_DIR)

    model = Ministral3ForCausalLM(mg.hf_config(CASE)).eval()
    assert model.config._attn_implementation == "eager"
    mg.init_params(model, CASE["seed"])
    ramp = mg.check_yarn_against_spec(CASE, model)
    (OUT_DIR / "config.json").write_text(json.dumps(mg.nld_config(CASE), indent=2) + "\n")
    mg.write_weights(OUT_DIR, CASE, mg.nld_state_dict(model))

    rng = np.random.default_rng(CASE["seed"])
    input_ids = rng.integers(0, CASE["vocab_size"], size=(1, SEQ_LEN)).astype(np.int32)
    logits = mg.causal_logits(model, input_ids).astype(np.float32)
    cache_err = float(np.abs(cached_logits(model, input_ids) - logits).max())
    assert cache_err < CACHE_TOL, f"transformers cached != no-cache logits: {cache_err}"

    prompt = input_ids[0, :PROMPT_LEN]
    # First pass without a reachable EOS (id vocab_size), then record an id it never emits.
    free = greedy_cached(model, prompt, CASE["vocab_size"])
    eos = mg.absent_id(free.tolist())
    ar = td.ar_generate(model, prompt.tolist(), max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert ar == free.tolist(), "transformers cached generate != no-cache argmax loop"
    margins = td.Margins()
    spec = td.self_spec_generate(model, model, prompt.tolist(), block_size=BLOCK_SIZE,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                 mask_token_id=mg.MASK_ID, margins=margins)
    assert spec.tokens == ar, f"self-spec != greedy AR: {spec.tokens} vs {ar}"
    diff = td.diffusion_generate(model, prompt.tolist(), block_size=BLOCK_SIZE,
                                 threshold=THRESHOLD, steps_per_block=None,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                 mask_token_id=mg.MASK_ID, margins=margins)
    assert len(diff.tokens) == NEW_TOKENS and eos not in diff.tokens, diff.tokens

    np.savez_compressed(
        OUT_DIR / "golden.npz", input_ids=input_ids, logits_f32=logits, prompt=prompt,
        eos_token_id=np.int32(eos), ar_tokens=np.asarray(ar, np.int32),
        self_spec_tokens=np.asarray(spec.tokens, np.int32),
        diffusion_tokens=np.asarray(diff.tokens, np.int32),
        diffusion_forwards=np.int32(diff.num_forwards),
        diffusion_steps=np.asarray(diff.steps_per_block_used, np.int32))
    gap_forward = float(mg.top2_gap(logits).min())
    print(f"logits std {logits.std():.4f}; transformers cached vs no-cache {cache_err:.1e}")
    print(f"min top-2 gap: forward {gap_forward:.2e}, decoding argmaxes {margins.argmax_gap:.2e}")
    print(f"eos {eos}; AR {ar}")
    print(f"diffusion steps per block {diff.steps_per_block_used}, forwards {diff.num_forwards}")
    write_readme(cache_err, gap_forward, margins.argmax_gap, diff.steps_per_block_used, ramp)
    total = sum(p.stat().st_size for p in mg.FIXTURES_DIR.rglob("*") if p.is_file())
    assert total < mg.MAX_FIXTURE_BYTES, f"tests/fixtures is {total} bytes"


def write_readme(cache_err: float, gap_forward: float, gap_decode: float,
                 steps: list[int], ramp: list[float]) -> None:
    lines = [
        "# Long-context golden fixture (external oracle)",
        "",
        "Generated by `python3 tests/reference/make_long_golden.py` (do not edit by hand).",
        f"Oracle: transformers {transformers.__version__} `Ministral3ForCausalLM` on torch",
        f"{torch.__version__} (eager attention, CPU, float32), one tiny random model initialised",
        "as the golden/ cases (bf16-rounded parameters), in the released NLD layout.",
        f"Config: vocab {CASE['vocab_size']}, hidden {CASE['hidden_size']}, "
        f"{CASE['num_hidden_layers']} layers, {CASE['num_attention_heads']} q / "
        f"{CASE['num_key_value_heads']} kv heads, head_dim {CASE['head_dim']}, theta "
        f"{CASE['rope_theta']:.0e}, max_position_embeddings {SEQ_LEN}, YaRN {CASE['yarn']}:",
        f"positions up to {SEQ_LEN - 1} cross "
        "the query-scaling steps at every multiple of 32 (scale 1 + 0.1 ln(1 + floor(pos/32))).",
        f"YaRN ramp (spec/model.md formula, checked against transformers' inv_freq): {ramp}.",
        "",
        f"`golden.npz`: `input_ids` int32 [1, {SEQ_LEN}], `logits_f32` [1, {SEQ_LEN}, V] (causal,",
        f"no cache; transformers' cached path, a {PROMPT_LEN}-token prefill then blocks of "
        f"{CACHED_BLOCK}, agrees to {cache_err:.1e});",
        f"`prompt` int32 [{PROMPT_LEN}] = input_ids[0, :{PROMPT_LEN}]; `eos_token_id` (an id no "
        "run emits);",
        f"`ar_tokens` [{NEW_TOKENS}] greedy AR (transformers generate with its cache == no-cache "
        "loop);",
        f"`self_spec_tokens` [{NEW_TOKENS}] greedy linear self-speculation B={BLOCK_SIZE}, no "
        "adapter (torch_decoding.py; == ar_tokens);",
        f"`diffusion_tokens` [{NEW_TOKENS}], `diffusion_forwards`, `diffusion_steps` "
        f"[{NEW_TOKENS // BLOCK_SIZE}]: greedy block",
        f"diffusion B={BLOCK_SIZE}, threshold {THRESHOLD} (torch_decoding.py), steps per block "
        f"{steps}.",
        f"Prompt + new tokens = {SEQ_LEN} = max_position_embeddings.",
        "",
        f"Smallest top-1 minus top-2 logit gap: causal forward {gap_forward:.2e}; every argmax "
        f"the decoding runs used {gap_decode:.2e}.",
    ]
    (OUT_DIR / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
