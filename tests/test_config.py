"""NLDConfig: presets, both RoPE spellings, validation."""

from __future__ import annotations

import json

import pytest

from nld_jax import ConfigError, NLDConfig
from nld_jax.model import rope_inv_freq
from tests.conftest import GOLDEN_DIR


@pytest.mark.parametrize("name,params", [("3B", 3.83e9), ("8B", 8.49e9), ("14B", 13.51e9)])
def test_presets_match_published_sizes(name, params):
    config = NLDConfig.preset(name)
    assert abs(config.num_parameters - params) / params < 0.01
    assert config.head_dim == 128 and config.num_query_groups == 4
    assert config.rope_attention_factor == 1.0


@pytest.mark.parametrize("theta,low,high", [(1e6, 20, 37), (1e9, 13, 25)])
def test_yarn_ramp_bounds_from_spec(theta, low, high):
    inv = rope_inv_freq(NLDConfig.preset("8B", rope_theta=theta))
    pos = theta ** (2 * __import__("numpy").arange(64) / 128)
    extrap, interp = 1 / pos, 1 / (16 * pos)
    assert abs(inv[low] / extrap[low] - 1) < 1e-5  # below the ramp: pure extrapolation
    assert abs(inv[high] / interp[high] - 1) < 1e-5  # above it: pure interpolation
    assert extrap[low + 1] > inv[low + 1] > interp[low + 1]


def test_both_rope_spellings():
    new = NLDConfig.from_json(GOLDEN_DIR / "gqa4_theta1e6")
    old = NLDConfig.from_json(GOLDEN_DIR / "gqa3_theta1e9_sharded" / "config.json")
    assert new.original_max_position_embeddings == old.original_max_position_embeddings == 32
    assert (new.rope_theta, old.rope_theta) == (1e6, 1e9)
    assert new.eos_token_ids == (11,) and new.mask_token_id == 100


def test_roundtrip(tmp_path):
    config = NLDConfig.preset("14B")
    config.save_json(tmp_path / "config.json")
    assert NLDConfig.from_json(tmp_path) == config


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("hidden_size"), "'hidden_size'"),
    (lambda c: c.pop("mask_token_id"), "'mask_token_id'"),
    (lambda c: c["rope_parameters"].pop("factor"), "rope_parameters.'factor'"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers=0"),
    (lambda c: c.update(head_dim=31), "head_dim=31"),
    (lambda c: c.update(mask_token_id=500), "mask_token_id=500"),
    (lambda c: c.update(eos_token_id=[11, -1]), "eos_token_id=-1"),
    (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c["rope_parameters"].update(rope_type="longrope"), "rope_type='longrope'"),
    (lambda c: c["rope_parameters"].update(beta_fast=0.5), "beta_fast"),
    (lambda c: c.update(rms_norm_eps=-1), "rms_norm_eps"),
    (lambda c: c.update(num_attention_heads="32"), "num_attention_heads"),
    # Found by tests/test_fuzz_loading.py: wrong types raised ValueError or were accepted.
    (lambda c: c["rope_parameters"].update(factor="x"), "rope_parameters.factor='x' must be a"),
    (lambda c: c["rope_parameters"].update(beta_slow=[1]), "beta_slow=[1] must be a number"),
    (lambda c: c["rope_parameters"].update(mscale_all_dim=[]), "mscale_all_dim=[] must be a"),
    (lambda c: c["rope_parameters"].update(mscale=float("nan")), "mscale=nan must be a finite"),
    (lambda c: c["rope_parameters"].update(truncate="yes"), "truncate='yes' must be true or"),
    (lambda c: c["rope_parameters"].update(rope_theta=True), "rope_theta=True must be a num"),
    (lambda c: c.update(rms_norm_eps="1e-5"), "rms_norm_eps='1e-5' must be a number"),
])
def test_bad_fields_are_named(tmp_path, edit, message):
    raw = json.loads((GOLDEN_DIR / "gqa4_theta1e6" / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        NLDConfig.from_json(tmp_path)
    assert message in str(info.value) and "config.json" in str(info.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="no such config"):
        NLDConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        NLDConfig.from_json(tmp_path)
