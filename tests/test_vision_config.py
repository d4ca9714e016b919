"""The VLM config: the released fields, its guesses as config fields, strict validation."""

from __future__ import annotations

import json

import pytest

from nld_jax import ConfigError, NLDConfig
from nld_jax.config import MultimodalConfig, VisionConfig


def test_vlm_preset_sizes_and_defaults():
    config = NLDConfig.preset("VLM-8B")
    mm = config.multimodal
    assert mm is not None and mm.vision == VisionConfig()
    vision = mm.num_parameters(config.hidden_size)
    assert abs(vision - 0.43e9) / 0.43e9 < 0.01  # spec section 2: "about 0.43B"
    assert config.num_parameters == NLDConfig.preset("8B").num_parameters + vision
    # The spec's guesses, as defaults.
    assert (mm.image_start_token_id, mm.image_token_id, mm.image_break_token_id,
            mm.image_end_token_id) == (18, 19, 20, 21)
    assert (mm.max_image_size, mm.image_background, mm.projector_hidden_act,
            mm.vision_feature_layer) == (1400, (255, 255, 255), "gelu", -1)
    assert mm.token_pixels == 28 and mm.vision_layers_run == 24
    assert NLDConfig.preset("8B").multimodal is None


def test_vlm_roundtrip(tmp_path):
    config = NLDConfig.preset("VLM-8B")
    config.save_json(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["NemotronLabsDiffusionVLMModel"]
    assert raw["vision_config"]["patch_size"] == 14
    assert NLDConfig.from_json(tmp_path) == config


def released_style_config() -> dict:
    """Root text fields plus a nested vision_config, as the released VLM config.json."""
    raw = NLDConfig.preset("VLM-8B").to_hf_dict()
    for key in ("image_token_id", "image_start_token_id", "image_break_token_id",
                "image_end_token_id", "max_image_size", "image_background"):
        raw.pop(key)  # our own fields: absent from the released file
    raw["vision_config"].pop("head_dim")
    raw["image_token_index"] = 10  # Mistral3's name; the model code uses its constant 19
    raw.pop("vision_feature_layer")  # read with a default of -1
    return raw


def test_released_layout_reads_with_defaults():
    config = NLDConfig.from_dict(released_style_config())
    assert config.multimodal == MultimodalConfig()


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"].pop("hidden_size"), "vision_config.hidden_size"),
    (lambda c: c.pop("vision_config") and c.update(vision_config=3), "vision_config"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
    (lambda c: c["vision_config"].update(num_hidden_layers=0), "num_hidden_layers=0"),
    (lambda c: c["vision_config"].update(head_dim=30), "head_dim=30"),
    (lambda c: c.update(multimodal_projector_bias=True), "multimodal_projector_bias"),
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act='relu'"),
    (lambda c: c.update(vision_feature_layer=-26), "vision_feature_layer=-26"),
    (lambda c: c.update(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
    (lambda c: c.update(spatial_merge_size=3), "spatial_merge_size=3"),
    (lambda c: c.update(image_token_id=200000), "image_token_id=200000"),
    (lambda c: c.update(image_end_token_id=19), "must be distinct"),
    (lambda c: c.update(image_background=[0, 0, 300]), "image_background"),
])
def test_bad_vlm_fields_are_named(edit, message):
    raw = released_style_config()
    edit(raw)
    with pytest.raises(ConfigError) as info:
        NLDConfig.from_dict(raw, source="vlm/config.json")
    assert message in str(info.value) and "vlm/config.json" in str(info.value)
