"""Image preprocessing for the VLM (spec/vlm.md section 5) and the image span of a prompt.

`load_image` decodes with Pillow, composites transparency over a background, caps the longer side
at `max_image_size`, rounds each side up to a multiple of 28 (two 14-pixel patches: one merged
token), resizes the ORIGINAL image with OpenCV's INTER_CUBIC rule (a = -0.75, half-pixel centres,
replicated borders, no antialias, no clamp; ported to NumPy below so OpenCV is no runtime
dependency) and normalises with the CLIP mean and std. Every check happens on the host before
any device work.

`image_token_ids` lays out an image in the prompt: <|image_start|>, then per row of merged tokens
w_tok <|image_pad|> and an <|image_break|>, the last row ending in <|image_end|> instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "image_token_ids", "image_grid", "resize_bicubic",
           "CLIP_MEAN", "CLIP_STD", "TOKEN_PIXELS", "MAX_SOURCE_PIXELS"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKEN_PIXELS = 28  # patch 14 x spatial merge 2: one image token covers 28 x 28 pixels
# Larger sources are refused before decoding (a decompression bomb would exhaust memory long
# before the resize shrinks it to at most max_image_size on the longer side).
MAX_SOURCE_PIXELS = 100_000_000
_CUBIC_A = np.float32(-0.75)  # OpenCV's INTER_CUBIC coefficient


class ImageError(ValueError):
    """An input that is not a usable image; the message names the file or array."""


def _decode(path: str, background: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    """A file -> uint8 RGB [H, W, 3], transparency composited over `background`."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{path}: {width}x{height} pixels is more than the "
                                 f"{max_pixels} this loader accepts")
            image.load()  # raises OSError on a truncated file
            return _to_rgb(image, background)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can decode") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: cannot decode the image ({e})") from None


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    # mistral-common's rule (a spec guess, hence the parameter): anything with transparency is
    # composited over an opaque background; everything else is converted to RGB directly.
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return np.asarray(Image.alpha_composite(base, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _from_array(array: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 [H, W], [H, W, 3] or [H, W, 4] -> uint8 RGB [H, W, 3]."""
    if array.dtype != np.uint8:
        raise ImageError(f"image array has dtype {array.dtype}; pass uint8 pixels in [0, 255] "
                         "(float arrays are ambiguous about their range)")
    if array.ndim == 2:
        array = array[:, :, None].repeat(3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"image array has shape {array.shape}; expected [H, W], [H, W, 3] "
                         "or [H, W, 4]")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array has zero size: shape {array.shape}")
    if array.shape[2] == 4:
        return _to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA"), background)
    return np.ascontiguousarray(array)


def image_grid(height: int, width: int, max_image_size: int = 1400) -> tuple[int, int]:
    """(h_tok, w_tok): merged-token rows and columns of an image of this source size.

    The longer side is capped at `max_image_size` (Python's round, ties to even, as the
    checkpoint's image_processing.py), then each side is rounded up to a multiple of 28.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image size {height}x{width} must be positive")
    ratio = max(width, height) / max_image_size
    if ratio > 1:
        width, height = round(width / ratio), round(height / ratio)
    return (height - 1) // TOKEN_PIXELS + 1, (width - 1) // TOKEN_PIXELS + 1


def _cubic_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_CUBIC taps for one axis: (indices int [dst, 4], weights float32 [dst, 4])."""
    # Source coordinate of output pixel i: (i + 0.5) * src / dst - 0.5, split exactly (integer
    # arithmetic) into a floor and a fraction. OpenCV's multi-row path reuses the taps of one
    # period of src/dst, which is what the exact fraction gives; a float32 coordinate drifts by
    # up to 1e-4 of a pixel at x ~ 1000.
    numerator = (2 * np.arange(dst, dtype=np.int64) + 1) * src - dst
    start = numerator // (2 * dst)
    t = ((numerator - start * 2 * dst) / (2 * dst)).astype(np.float32)
    a, one = _CUBIC_A, np.float32(1)
    w0 = ((a * (t + one) - 5 * a) * (t + one) + 8 * a) * (t + one) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + one
    w2 = ((a + 2) * (one - t) - (a + 3)) * (one - t) * (one - t) + one
    w3 = one - w0 - w1 - w2
    taps = np.clip(start[:, None] + np.arange(-1, 3)[None, :], 0, src - 1)  # replicated border
    return taps, np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [H, W, C] -> float32 [height, width, C] as cv2.resize(..., INTER_CUBIC).

    Separable, rows first (horizontal taps, then vertical), float32 accumulation in tap order.
    """
    image = np.asarray(image, dtype=np.float32)
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image.copy()
    col_taps, col_w = _cubic_taps(src_w, width)
    row_taps, row_w = _cubic_taps(src_h, height)
    horizontal = image[:, col_taps[:, 0]] * col_w[None, :, 0, None]
    for k in range(1, 4):
        horizontal = horizontal + image[:, col_taps[:, k]] * col_w[None, :, k, None]
    out = horizontal[row_taps[:, 0]] * row_w[:, 0, None, None]
    for k in range(1, 4):
        out = out + horizontal[row_taps[:, k]] * row_w[:, k, None, None]
    return out


def load_image(source: str | os.PathLike | np.ndarray | Image.Image, *,
               max_image_size: int = 1400, background: Sequence[int] = (255, 255, 255),
               max_source_pixels: int = MAX_SOURCE_PIXELS) -> np.ndarray:
    """Decodes and preprocesses one image for the vision tower.

    Args:
      source: an image file path, a PIL image, or a uint8 array [H, W], [H, W, 3] (RGB) or
        [H, W, 4] (RGBA).
      max_image_size: cap on the longer side before rounding to 28 (the checkpoint's default
        1400 is a spec guess; the card's image_size is 1540).
      background: RGB that transparent pixels are composited over (spec guess: white).
      max_source_pixels: larger sources are refused before decoding.
    Returns:
      float32 [3, 28*h_tok, 28*w_tok], normalised with the CLIP mean and std.
    Raises:
      ImageError: not an image, zero size, truncated, too large, or a bad array.
    """
    bg = tuple(int(c) for c in background)
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ImageError(f"background={background!r} must be three values in [0, 255]")
    if isinstance(max_image_size, bool) or not isinstance(max_image_size, int) \
            or max_image_size < TOKEN_PIXELS:
        raise ImageError(f"{max_image_size=} must be an integer >= {TOKEN_PIXELS}")
    if isinstance(source, Image.Image):
        if source.width * source.height == 0:
            raise ImageError(f"PIL image has zero size {source.size}")
        rgb = _to_rgb(source, bg)
    elif isinstance(source, np.ndarray):
        rgb = _from_array(source, bg)
    elif isinstance(source, (str, os.PathLike)):
        rgb = _decode(os.fspath(source), bg, max_source_pixels)
    else:
        raise ImageError(f"expected a path, a PIL image or a uint8 array, got "
                         f"{type(source).__name__}")
    if rgb.shape[0] * rgb.shape[1] > max_source_pixels:
        raise ImageError(f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is more than the "
                         f"{max_source_pixels} this loader accepts")
    h_tok, w_tok = image_grid(rgb.shape[0], rgb.shape[1], max_image_size)
    resized = resize_bicubic(rgb.astype(np.float32), TOKEN_PIXELS * h_tok, TOKEN_PIXELS * w_tok)
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    normalised = (resized / np.float32(255) - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def image_token_ids(h_tok: int, w_tok: int, *, start_id: int, pad_id: int, break_id: int,
                    end_id: int) -> list[int]:
    """The prompt span of one image: 1 + h_tok * (w_tok + 1) ids, h_tok * w_tok of them pads."""
    if h_tok <= 0 or w_tok <= 0:
        raise ImageError(f"image grid {h_tok}x{w_tok} must be positive")
    span = [start_id]
    for row in range(h_tok):
        span += [pad_id] * w_tok + [end_id if row == h_tok - 1 else break_id]
    return span
