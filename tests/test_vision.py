"""The vision tower and projector against transformers (tests/fixtures/vlm, spec/vlm.md 8)."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from nld_jax.config import NLDConfig
from nld_jax.image import ImageError, image_token_ids
from nld_jax.vision import (
    VisionEncoder,
    _host_inputs,
    embed_with_images,
    encode_images,
    image_feature_index,
    patch_bucket,
)

VLM_DIR = pathlib.Path(__file__).parent / "fixtures" / "vlm"
F32_TOL = 1e-5  # float32 tower/projector vs transformers float32 (both from bf16 weights)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(VLM_DIR / "golden.npz") as data:
        return {k: data[k] for k in data.files}


def hf_vision_encoder(path: pathlib.Path, dtype: str = "float32") -> VisionEncoder:
    """The fixture's vision tensors placed by hand, independently of nld_jax.loading."""
    config = NLDConfig.from_json(path)
    v = config.multimodal.vision
    d, n, h, layers = v.hidden_size, v.num_attention_heads, v.head_dim, v.num_hidden_layers
    with safe_open(path / "model.safetensors", "numpy") as f:
        t = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    tower, proj = "encoder.vision_tower.", "encoder.multi_modal_projector."

    def stacked(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([t[f"{tower}transformer.layers.{i}.{name}"].T.reshape(shape)
                         for i in range(layers)])

    encoder = VisionEncoder(config, dtype=dtype, rngs=nnx.Rngs(0))
    values = {
        "patch_pd": t[tower + "patch_conv.weight"].reshape(d, -1).T,
        "ln_pre_d": t[tower + "ln_pre.weight"],
        "attn_norm_ld": stacked("attention_norm.weight", (d,)),
        "ffn_norm_ld": stacked("ffn_norm.weight", (d,)),
        "q_ldnh": stacked("attention.q_proj.weight", (d, n, h)),
        "k_ldnh": stacked("attention.k_proj.weight", (d, n, h)),
        "v_ldnh": stacked("attention.v_proj.weight", (d, n, h)),
        "o_lnhd": stacked("attention.o_proj.weight", (n, h, d)),
        "gate_ldf": stacked("feed_forward.gate_proj.weight", (d, -1)),
        "up_ldf": stacked("feed_forward.up_proj.weight", (d, -1)),
        "down_lfd": stacked("feed_forward.down_proj.weight", (-1, d)),
        "proj_norm_d": t[proj + "norm.weight"],
        "merge_kd": t[proj + "patch_merger.merging_layer.weight"].T,
        "linear_1_de": t[proj + "linear_1.weight"].T,
        "linear_2_ee": t[proj + "linear_2.weight"].T,
    }
    for name, value in values.items():
        getattr(encoder, name)[...] = jnp.asarray(value, encoder.dtype)
    return encoder


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return hf_vision_encoder(VLM_DIR)


def test_tower_and_projector_match_transformers(encoder, golden):
    for name in ("a", "b"):
        image = golden[f"image_{name}"]
        features = np.asarray(encode_images(encoder, [image])[0])
        np.testing.assert_allclose(features, golden[f"features_{name}"], rtol=0, atol=F32_TOL)
        # The tower alone (padded to its bucket: padding must not leak into the valid rows).
        patches = image.shape[1] * image.shape[2] // 14 ** 2
        inputs = _host_inputs([image], 14, patch_bucket(patches) + 4, 1)
        hidden = np.asarray(encoder.tower(*inputs[:4]))[0, :patches]
        np.testing.assert_allclose(hidden, golden[f"tower_{name}"], rtol=0, atol=F32_TOL)


def test_two_sizes_in_one_call_equal_each_alone(encoder, golden):
    a, b = golden["image_a"], golden["image_b"]
    features = encode_images(encoder, [b, a, b])
    assert [f.shape for f in features] == [(2, 64), (6, 64), (2, 64)]
    np.testing.assert_allclose(np.asarray(features[1]), golden["features_a"], atol=F32_TOL)
    for i in (0, 2):
        np.testing.assert_allclose(np.asarray(features[i]), golden["features_b"], atol=F32_TOL)


def test_a_planted_bug_fails(golden):
    # Swapping the patch-merge order (row-major instead of channel-major) must be caught.
    encoder = hf_vision_encoder(VLM_DIR)
    d = encoder.mm.vision.hidden_size
    merge = np.asarray(encoder.merge_kd[...]).reshape(d, 4, -1).transpose(1, 0, 2)
    encoder.merge_kd[...] = jnp.asarray(merge.reshape(4 * d, -1))
    features = np.asarray(encode_images(encoder, [golden["image_a"]])[0])
    assert np.abs(features - golden["features_a"]).max() > 100 * F32_TOL


def test_bf16_tower_on_request(golden):
    encoder = hf_vision_encoder(VLM_DIR, dtype="bfloat16")
    features = np.asarray(encode_images(encoder, [golden["image_a"]])[0], np.float32)
    scale = np.abs(golden["features_a"]).max()
    assert np.abs(features - golden["features_a"]).max() < 0.1 * scale


def test_patch_buckets():
    assert [patch_bucket(n) for n in (1, 4, 5, 8, 9, 24, 100, 10000)] == \
        [4, 4, 5, 8, 10, 24, 112, 10240]
    for n in range(4, 5000, 4):
        bucket = patch_bucket(n)
        assert n <= bucket < 1.25 * n + 4


def test_bad_images_are_named(encoder):
    with pytest.raises(ImageError, match=r"images\[0\] has shape"):
        encode_images(encoder, [np.zeros((28, 28, 3), np.float32)])
    with pytest.raises(ImageError, match="multiples of 28"):
        encode_images(encoder, [np.zeros((3, 28, 30), np.float32)])
    with pytest.raises(ImageError, match="dtype uint8"):
        encode_images(encoder, [np.zeros((3, 28, 28), np.uint8)])


def test_feature_index_and_splice(encoder):
    mm = encoder.mm
    ids = dict(start_id=18, pad_id=19, break_id=20, end_id=21)
    big, small = np.zeros((3, 56, 84), np.float32), np.zeros((3, 28, 56), np.float32)
    row0 = [1, 5] + image_token_ids(2, 3, **ids) + [6] + image_token_ids(1, 2, **ids) + [7]
    row1 = [1, 9, 9, 9] + [0] * (len(row0) - 4)
    tokens = np.array([row0, row1])
    index = image_feature_index(tokens, [[big, small], []], mm)
    pads0 = np.flatnonzero(tokens[0] == 19)
    assert index[0, pads0].tolist() == list(range(8)) and (index[1] == -1).all()
    assert (np.delete(index[0], pads0) == -1).all()
    embeds = jnp.zeros((2, tokens.shape[1], 4))
    features = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4) + 1
    spliced = np.asarray(embed_with_images(embeds, features, jnp.asarray(index)))
    np.testing.assert_array_equal(spliced[0, pads0], np.asarray(features))
    assert not spliced[0, np.delete(np.arange(tokens.shape[1]), pads0)].any()
    with pytest.raises(ImageError, match="2 image spans .* but 1 images"):
        image_feature_index(tokens[:1], [[big]], mm)
    with pytest.raises(ImageError, match="not the 2x2-token layout"):
        image_feature_index(tokens[:1], [[big, np.zeros((3, 56, 56), np.float32)]], mm)
    stray = tokens[1:].copy()
    stray[0, 2] = 19
    with pytest.raises(ImageError, match="outside any image span"):
        image_feature_index(stray, [[]], mm)
    with pytest.raises(ImageError, match="images has 1 rows"):
        image_feature_index(tokens, [[]], mm)


HOUSE = pathlib.Path(__file__).parents[1] / "examples" / "images" / "house.png"


def test_chat_prompt_places_image_spans(tmp_path):
    from nld_jax.tokenizer import load_tokenizer
    from nld_jax.vision import chat_prompt
    from tests.test_tokenizer import _write

    tokenizer = load_tokenizer(_write(tmp_path / "tok"))
    mm = NLDConfig.from_json(VLM_DIR).multimodal
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image", "image": str(HOUSE)},
        {"type": "text", "text": " and this"},
        {"type": "image_url", "image_url": {"url": f"file://{HOUSE}"}},
    ]}]
    ids, images = chat_prompt(tokenizer, messages, mm)
    assert len(images) == 2 and images[0].shape == (3, 168, 252)  # 240x160 -> 9x6 tokens
    np.testing.assert_array_equal(images[0], images[1])
    span = image_token_ids(6, 9, start_id=18, pad_id=19, break_id=20, end_id=21)
    starts = [i for i in range(len(ids)) if ids[i:i + len(span)] == span]
    assert len(starts) == 2 and ids.count(19) == 2 * 54
    text = tokenizer.render_chat([{"role": "user", "content": "what is this and this"}])
    before, between = ids[:starts[0]], ids[starts[0] + len(span):starts[1]]
    after = ids[starts[1] + len(span):]
    assert tokenizer.decode(before) + tokenizer.decode(between) + tokenizer.decode(after) == \
        tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    assert tokenizer.decode(before).endswith("what is this")
    # Generation-ready: the prompt ends with the assistant header.
    assert tokenizer.decode(after).endswith("<think></think>")
    with pytest.raises(ImageError, match="only local files"):
        chat_prompt(tokenizer, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}], mm)
    with pytest.raises(ValueError, match="content items"):
        chat_prompt(tokenizer, [{"role": "user", "content": [{"type": "audio"}]}], mm)


def test_query_chunks_give_the_same_features(golden):
    # A 1400 px image's tower attends in chunks of 1024 queries; at this size chunks of 8 (and
    # of 4 in a 28-patch bucket) exercise the same path against the oracle.
    encoder = hf_vision_encoder(VLM_DIR)
    encoder.query_chunk = 8
    features = np.asarray(encode_images(encoder, [golden["image_a"], golden["image_b"]])[0])
    np.testing.assert_allclose(features, golden["features_a"], rtol=0, atol=F32_TOL)
    inputs = _host_inputs([golden["image_a"]], 14, 28, 1)
    hidden = np.asarray(encoder.tower(*inputs[:4]))[0, :24]
    np.testing.assert_allclose(hidden, golden["tower_a"], rtol=0, atol=F32_TOL)


def test_identical_images_are_encoded_once(encoder, golden, monkeypatch):
    import nld_jax.vision as vision

    batches: list[int] = []
    host_inputs = vision._host_inputs

    def counting(images, *args):
        batches.append(len(images))
        return host_inputs(images, *args)

    monkeypatch.setattr(vision, "_host_inputs", counting)
    a, b = golden["image_a"], golden["image_b"]
    features = encode_images(encoder, [a, b, a.copy(), b, a])
    assert sorted(batches) == [1, 1]  # one a, one b
    for i in (0, 2, 4):
        np.testing.assert_allclose(np.asarray(features[i]), golden["features_a"], atol=F32_TOL)
    for i in (1, 3):
        np.testing.assert_allclose(np.asarray(features[i]), golden["features_b"], atol=F32_TOL)
