"""Diffusion and self-spec greedy decoding against the transformers-backed reference.

`tests/reference/torch_decoding.py` runs spec/decoding.md literally on transformers'
Ministral3ForCausalLM (float32); `decode.json` holds its tokens and forward counts.
"""

from __future__ import annotations

import collections
import json

import pytest

import nld_jax
from tests.conftest import GOLDEN_CASES, GOLDEN_DIR


def _runs() -> list[tuple[str, int]]:
    out = []
    for case in GOLDEN_CASES:
        runs = json.loads((GOLDEN_DIR / case / "decode.json").read_text())["runs"]
        out += [(case, i) for i in range(len(runs))]
    return out


@pytest.fixture(scope="module")
def models():
    cache: dict[tuple[str, bool], nld_jax.NLDModel] = {}

    def get(case: str, lora: bool) -> nld_jax.NLDModel:
        if (case, lora) not in cache:
            cache[case, lora] = nld_jax.load_model(GOLDEN_DIR / case, dtype="float32",
                                                   lora=None if lora else False)
        return cache[case, lora]

    return get


def _describe(run: dict) -> str:
    keys = ("mode", "prompt_index", "block_size", "threshold", "steps_per_block", "lora",
            "eos_case")
    return ", ".join(f"{k}={run[k]}" for k in keys)


def test_golden_runs_cover_the_issue():
    runs = [json.loads((GOLDEN_DIR / c / "decode.json").read_text())["runs"]
            for c in GOLDEN_CASES]
    flat = [r for rs in runs for r in rs]
    kinds = {(r["mode"], r["block_size"], r["threshold"] is None, r["lora"]) for r in flat}
    assert {("diffusion", 4, False, False), ("diffusion", 8, False, False),
            ("diffusion", 4, True, False), ("diffusion", 8, True, False),
            ("self_spec", 4, True, False), ("self_spec", 8, True, True)} <= kinds
    # Several tokens committed per step somewhere, and EOS stops inside blocks.
    assert any(r["mode"] == "diffusion" and r["num_forwards"] < len(r["tokens"]) for r in flat)
    assert any(r["eos_case"] == "output_9" and len(r["tokens"]) % r["block_size"] for r in flat)


@pytest.mark.parametrize("case,index", _runs())
def test_matches_golden(models, case, index):
    run = json.loads((GOLDEN_DIR / case / "decode.json").read_text())["runs"][index]
    model = models(case, run["lora"])
    kwargs = dict(block_size=run["block_size"], max_new_tokens=run["max_new_tokens"],
                  eos_token_ids=[run["eos_token_id"]])
    if run["mode"] == "diffusion":
        kwargs.update(threshold=run["threshold"], denoise_steps=run["steps_per_block"])
    out = nld_jax.generate(model, [run["prompt"]], mode=run["mode"], **kwargs)
    assert out.tokens[0] == run["tokens"], _describe(run)
    assert out.num_forwards == run["num_forwards"], _describe(run)
    if run["mode"] == "diffusion":
        used = run["steps_per_block_used"]
        assert out.stats["num_blocks"] == len(used)
        assert out.stats["denoise_steps_per_block"] == pytest.approx(sum(used) / max(len(used), 1))
    else:
        histogram = collections.Counter(run["accepted"])
        assert out.stats["accepted_histogram"] == [histogram[c] for c in range(run["block_size"])]
