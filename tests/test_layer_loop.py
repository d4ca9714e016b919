"""The two layer loops of NLDModel.forward: the same tokens, and no per-step KV-cache copy.

A decode step reads the stacked cache in every layer and then writes the block's K/V into it.
Unless every read is ordered before the write, XLA's copy insertion keeps the reads intact by
copying the whole cache each step (what the unrolled loop did: two [L, B, S, K, H] copies per
decode step). The optimised program must hold no copy of a cache-shaped buffer.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import numpy as np
import pytest
from flax import nnx

import nld_jax
from nld_jax.model import NLDModel

generate_module = importlib.import_module("nld_jax.generate")


@pytest.fixture(scope="module")
def model() -> nld_jax.NLDModel:
    """A random two-layer model with the draft adapter (self_spec drafts with it)."""
    model = NLDModel(nld_jax.NLDConfig.preset("tiny"), dtype="float32", rngs=nnx.Rngs(0))
    model.attach_lora(4, 1.0, rngs=nnx.Rngs(1))
    return model


def _generate_with_hlo(model: nld_jax.NLDModel, mode: str, monkeypatch: pytest.MonkeyPatch
                       ) -> tuple[list[list[int]], str, int]:
    """(generated tokens, the optimised HLO of the program that made them, cache slots S)."""
    program = generate_module._program
    seen: list[Any] = []

    def compile_and_run(*args: Any, static: Any, **kwargs: Any) -> Any:
        compiled = program.lower(*args, static=static, **kwargs).compile()
        seen.append((compiled.as_text(), static.capacity))
        return compiled(*args[1:], **kwargs)  # graphdef (first) is static

    prompts = np.random.default_rng(11).integers(1, 100, (2, 20)).tolist()
    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "_program", compile_and_run)
        out = nld_jax.generate(model, prompts, mode=mode, max_new_tokens=12)
    (hlo, capacity), = seen
    return out.tokens, hlo, capacity


def cache_copies(hlo: str, config: nld_jax.NLDConfig, dtype: str, batch: int,
                 capacity: int) -> int:
    """Copies of a whole K or V cache [L, B, S, K, H] in the loops of an optimised HLO module:
    not in a fusion (a copy there is a layout change of the elements the fusion reads) nor in
    the entry computation (run once: it may copy the zeroed cache it starts from)."""
    c = config
    hlo_dtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    shape = (f"{hlo_dtype}\\[{c.num_hidden_layers},{batch},{capacity},{c.num_key_value_heads},"
             f"{c.head_dim}\\]")
    fused = set(re.findall(r"kind=k\w+, calls=(%[\w.-]+)", hlo))
    copies = 0
    for computation in hlo.split("\n\n"):
        name = computation.lstrip().split(" ", 1)[0]
        if name not in fused and name != "ENTRY":
            copies += len(re.findall(rf"= {shape}\S* copy\(", computation))
    return copies


def test_unrolled_and_scanned_layers_agree_without_cache_copies(model, monkeypatch):
    # AR only, for CI time; self_spec's draft and verify writes were checked the same way.
    tokens = {}
    for loop in ("unroll", "scan"):
        model.layer_loop = loop
        try:
            tokens[loop], hlo, capacity = _generate_with_hlo(model, "ar", monkeypatch)
        finally:
            model.layer_loop = "auto"
        assert cache_copies(hlo, model.config, model.dtype.name, 2, capacity) == 0, loop
    assert tokens["unroll"] == tokens["scan"]
