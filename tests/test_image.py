"""Image preprocessing (spec/vlm.md section 5) against OpenCV, the checkpoint's own resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nld_jax.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageError,
    image_grid,
    image_token_ids,
    load_image,
    resize_bicubic,
)

cv2 = pytest.importorskip("cv2")  # the oracle; installed by the test extra

# OpenCV accumulates in float32 too, in another order: |difference| on the [0, 255] scale.
RESIZE_TOL = 1e-3
# After /255 and /std the same bound shrinks by ~1/66.
PIXEL_TOL = RESIZE_TOL / 255 / min(CLIP_STD)


def reference_preprocess(rgb: np.ndarray, max_image_size: int = 1400) -> np.ndarray:
    """Section 5 written with cv2, as the checkpoint's image_processing.py does it."""
    h, w = rgb.shape[:2]
    ratio = max(w, h) / max_image_size
    if ratio > 1:
        w, h = round(w / ratio), round(h / ratio)
    w_tok, h_tok = (w - 1) // 28 + 1, (h - 1) // 28 + 1
    resized = cv2.resize(rgb.astype(np.float32), (28 * w_tok, 28 * h_tok),
                         interpolation=cv2.INTER_CUBIC)
    normalised = (resized / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return normalised.transpose(2, 0, 1).astype(np.float32)


@pytest.mark.parametrize("src_hw, dst_hw", [
    ((200, 300), (224, 308)),  # the spec's example, upscale
    ((1000, 37), (1008, 56)),  # tall and narrow
    ((57, 2000), (28, 1400)),  # strong downscale, ratio 10/7
    ((1387, 1041), (1400, 1064)),
    ((30, 30), (56, 28)),  # up one axis, down the other
    ((8, 9), (28, 28)),
])
def test_resize_matches_opencv(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*src_hw, 3)).astype(np.float32)
    expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_CUBIC)
    out = resize_bicubic(image, *dst_hw)
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=RESIZE_TOL)


def test_resize_is_not_another_bicubic() -> None:
    # A planted bug must fail the comparison: Keys' a = -0.5 (PIL, jax.image) is far off.
    image = np.random.default_rng(1).integers(0, 256, (64, 80, 3)).astype(np.float32)
    expected = cv2.resize(image, (112, 84), interpolation=cv2.INTER_CUBIC)
    pil = np.stack([np.asarray(Image.fromarray(image[..., c]).resize((112, 84), Image.BICUBIC))
                    for c in range(3)], axis=-1)
    assert np.abs(pil - expected).max() > 100 * RESIZE_TOL
    np.testing.assert_allclose(resize_bicubic(image, 84, 112), expected, atol=RESIZE_TOL)


@pytest.mark.parametrize("size", [(300, 200), (1600, 900), (90, 2100), (28, 28), (29, 57)])
def test_load_image_matches_reference_pipeline(tmp_path, size: tuple[int, int]) -> None:
    width, height = size
    rgb = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    expected = reference_preprocess(rgb)
    for source in (path, str(path), rgb, Image.fromarray(rgb)):
        out = load_image(source)
        assert out.shape == expected.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=0, atol=PIXEL_TOL)


def test_spec_example_shape_and_span() -> None:
    # spec section 5/6: 300 x 200 -> 308 x 224, w_tok 11, h_tok 8, a 97-token span.
    image = load_image(np.zeros((200, 300, 3), np.uint8))
    assert image.shape == (3, 224, 308)
    h_tok, w_tok = image_grid(200, 300)
    assert (h_tok, w_tok) == (8, 11)
    span = image_token_ids(h_tok, w_tok, start_id=18, pad_id=19, break_id=20, end_id=21)
    assert len(span) == 97 and span.count(19) == 88
    assert span[0] == 18 and span[-1] == 21 and span.count(20) == 7 and span.count(21) == 1
    assert span[12] == 20 and span[1:12] == [19] * 11  # row 0: 11 pads then a break


def test_cap_rounds_half_to_even() -> None:
    # 2800 x 57 capped at 1400: ratio 2, height 28.5 -> 28 (Python round), one token row;
    # rounding half up (or HF Pixtral's ceil) would give two.
    assert image_grid(57, 2800, max_image_size=1400) == (1, 50)
    assert image_grid(59, 2800, max_image_size=1400) == (2, 50)  # 29.5 -> 30
    assert image_grid(1000, 3000) == (17, 50)  # 466.7 -> 467
    assert image_grid(200, 300, max_image_size=560) == (8, 11)  # no cap below the limit


def test_max_image_size_bounds_the_grid() -> None:
    image = load_image(np.zeros((100, 2000, 3), np.uint8), max_image_size=560)
    assert image.shape == (3, 28, 560)


def test_transparency_composited_over_background() -> None:
    rgba = np.zeros((40, 60, 4), np.uint8)  # fully transparent black
    white = load_image(rgba)
    expected_white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(white[:, 5, 5], expected_white, atol=1e-5)
    black = load_image(rgba, background=(0, 0, 0))
    np.testing.assert_allclose(black[:, 5, 5], -np.array(CLIP_MEAN) / np.array(CLIP_STD),
                               atol=1e-5)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_allclose(load_image(opaque), load_image(opaque[..., :3]), atol=0)


def test_grayscale_and_palette_become_rgb(tmp_path) -> None:
    gray = np.random.default_rng(2).integers(0, 256, (50, 70), dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)
    expected = load_image(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_allclose(load_image(path), expected, atol=0)
    np.testing.assert_allclose(load_image(gray), expected, atol=0)
    palette = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).convert("P")
    assert load_image(palette).shape == expected.shape


def test_bad_images_raise_image_error(tmp_path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(truncated)
    with pytest.raises(ImageError, match="pixels is more than"):
        load_image(good, max_source_pixels=64 * 63)
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="dtype float32"):
        load_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ImageError, match="max_image_size"):
        load_image(np.zeros((10, 10, 3), np.uint8), max_image_size=10)
    with pytest.raises(ImageError, match="expected a path"):
        load_image(42)  # type: ignore[arg-type]
