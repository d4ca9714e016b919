"""benchmarks/vision_cost.py: its FLOP count against XLA's, and BENCHMARKS.md holding its table."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from flax import nnx

from benchmarks import vision_cost as vc
from nld_jax.config import NLDConfig
from nld_jax.vision import VisionEncoder, _encode_bucket, _host_inputs

BENCHMARKS_MD = pathlib.Path(__file__).parents[1] / "BENCHMARKS.md"
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "vlm"


def test_benchmarks_md_holds_the_scripts_table():
    assert vc.table() in BENCHMARKS_MD.read_text()


def test_flops_agree_with_xla_cost_analysis():
    # One tower layer (XLA's cost analysis counts a while loop's body once): the count left out
    # only element-wise work (norms, RoPE, softmax, GELU), a few percent at this tiny width.
    base = NLDConfig.from_json(FIXTURE)
    vision = dataclasses.replace(base.multimodal.vision, num_hidden_layers=1)
    config = dataclasses.replace(base, multimodal=dataclasses.replace(base.multimodal,
                                                                      vision=vision))
    encoder = VisionEncoder(config, rngs=nnx.Rngs(0))
    side = 4 * 28  # 64 patches: exactly a bucket, no padding
    inputs = _host_inputs([np.zeros((3, side, side), np.float32)], 14, 64, 1)
    graphdef, state = nnx.split(encoder)
    analysis = _encode_bucket.lower(graphdef, state, *inputs).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    modelled = vc.cost(side, config).flops
    assert abs(analysis["flops"] - modelled) / modelled < 0.08


def test_released_shapes():
    c = vc.cost(1400)
    assert (c.tokens, c.patches) == (2500, 10000)  # spec: "about 2.5k image tokens"
    assert vc.cost(1000).tokens == 36 ** 2 and vc.cost(3000).tokens == 2500  # capped at 1400
    assert c.milliseconds("bf16") <= c.milliseconds("tf32")
