"""The VLM's image path (spec/vlm.md sections 3-4, 6): Pixtral tower, Mistral3 projector, splice.

`encode_images` turns preprocessed images ([3, H, W] float32 from `nld_jax.load_image`) into
image-token features [h_tok * w_tok, D_text]: the tower runs each image alone (full attention
inside the image, 2D RoPE by patch row and column), the projector merges 2x2 patches into one
token. Images are grouped by patch count into buckets of 4/5/6/7 x 2^k patches (at most 25%
padding, masked out of attention), so there is one jitted program per bucket and batch size, not
one per image size. `embed_with_images` then replaces the `<|image_pad|>` rows of the text
embeddings with those features, in prompt order.

The tower runs in float32 by default (`vision_dtype`): its activations reach the thousands and a
bf16 tower drifts ~20% from float32 (spec section 3.7).

Shape letters (beyond style.md): L tower layers, T patches of one image (bucketed), P patch
vector (C * 14 * 14, ordered channel, row, column), D tower width, N/H tower heads and head dim,
F tower MLP width, M merged tokens (T / 4), E text width.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nld_jax.config import MultimodalConfig, NLDConfig
from nld_jax.image import ImageError, image_token_ids, load_image

__all__ = ["VisionEncoder", "encode_images", "image_feature_index", "embed_with_images",
           "patch_bucket", "check_images", "chat_prompt", "prepare_images"]

_MERGE = 2  # spatial_merge_size (the config only allows 2)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype,
            std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """The checkpoint's RMSNorm: float32 statistics, cast back, times the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


class VisionEncoder(nnx.Module):
    """Pixtral tower (layers stacked on a leading [L] axis, run by scan) + Mistral3 projector."""

    def __init__(self, config: NLDConfig, *, dtype: jnp.dtype | str = jnp.float32,
                 rngs: nnx.Rngs):
        if config.multimodal is None:
            raise ValueError("VisionEncoder needs a config with a multimodal section")
        mm = config.multimodal
        v = mm.vision
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise ValueError(f"vision {dtype=} is not supported; use float32 or bfloat16")
        d, n, h, f, lay = (v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size,
                           v.num_hidden_layers)
        p, e = v.num_channels * v.patch_size ** 2, config.hidden_size
        self.mm = mm
        self.text_eps = config.rms_norm_eps
        self.dtype = dtype
        # Queries per attention chunk: the float32 scores [N, chunk, T] of one chunk are live at a
        # time, not [N, T, T] (a 1400 px image: 640 MiB instead of 6.25 GiB per layer).
        self.query_chunk = 1024
        # Tower.
        self.patch_pd = nnx.Param(_normal(rngs, (p, d), dtype))
        self.ln_pre_d = nnx.Param(jnp.ones((d,), dtype))
        self.attn_norm_ld = nnx.Param(jnp.ones((lay, d), dtype))
        self.q_ldnh = nnx.Param(_normal(rngs, (lay, d, n, h), dtype))
        self.k_ldnh = nnx.Param(_normal(rngs, (lay, d, n, h), dtype))
        self.v_ldnh = nnx.Param(_normal(rngs, (lay, d, n, h), dtype))
        self.o_lnhd = nnx.Param(_normal(rngs, (lay, n, h, d), dtype))
        self.ffn_norm_ld = nnx.Param(jnp.ones((lay, d), dtype))
        self.gate_ldf = nnx.Param(_normal(rngs, (lay, d, f), dtype))
        self.up_ldf = nnx.Param(_normal(rngs, (lay, d, f), dtype))
        self.down_lfd = nnx.Param(_normal(rngs, (lay, f, d), dtype))
        # Projector (no biases).
        self.proj_norm_d = nnx.Param(jnp.ones((d,), dtype))
        self.merge_kd = nnx.Param(_normal(rngs, (_MERGE * _MERGE * d, d), dtype))  # K = 4D
        self.linear_1_de = nnx.Param(_normal(rngs, (d, e), dtype))
        self.linear_2_ee = nnx.Param(_normal(rngs, (e, e), dtype))

    def _rope(self, rows_bt: jax.Array, cols_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """2D RoPE cos/sin [B, T, 1, H]: even frequencies turn with the row, odd with the column."""
        v = self.mm.vision
        freqs = 1.0 / (v.rope_theta ** (np.arange(0, v.head_dim, 2) / v.head_dim))
        f_row = jnp.asarray(freqs[0::2], jnp.float32)
        f_col = jnp.asarray(freqs[1::2], jnp.float32)
        angles = jnp.concatenate([rows_bt[..., None].astype(jnp.float32) * f_row,
                                  cols_bt[..., None].astype(jnp.float32) * f_col], axis=-1)
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        return jnp.cos(angles), jnp.sin(angles)

    def tower(self, patches_btp: jax.Array, rows_bt: jax.Array, cols_bt: jax.Array,
              valid_bt: jax.Array) -> jax.Array:
        """Patches -> hidden_states[vision_feature_layer] [B, T, D]; padded patches are masked
        out as keys (their own rows are garbage and ignored downstream)."""
        v = self.mm.vision
        eps, dtype = v.rms_norm_eps, self.dtype
        x = jnp.einsum("BTP,PD->BTD", patches_btp.astype(dtype), self.patch_pd[...])
        x = _rms_norm(x, self.ln_pre_d[...], eps)
        cos, sin = self._rope(rows_bt, cols_bt)
        half = v.head_dim // 2

        def rotate(t_btnh: jax.Array) -> jax.Array:
            t32 = t_btnh.astype(jnp.float32)
            turned = jnp.concatenate([-t32[..., half:], t32[..., :half]], axis=-1)
            return (t32 * cos + turned * sin).astype(dtype)

        # Additive key mask: finfo.min (not -inf) keeps an all-padding batch row finite.
        key_bias = jnp.where(valid_bt, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        scale = v.head_dim ** -0.5
        layers = self.mm.vision_layers_run
        weights = (self.attn_norm_ld, self.q_ldnh, self.k_ldnh, self.v_ldnh, self.o_lnhd,
                   self.ffn_norm_ld, self.gate_ldf, self.up_ldf, self.down_lfd)
        weights = tuple(w[...][:layers] for w in weights)

        def layer(h: jax.Array, w: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
            attn_norm, wq, wk, wv, wo, ffn_norm, gate, up, down = w
            y = _rms_norm(h, attn_norm, eps)
            q = rotate(jnp.einsum("BTD,DNH->BTNH", y, wq))
            k = rotate(jnp.einsum("BTD,DNH->BTNH", y, wk))
            val = jnp.einsum("BTD,DNH->BTNH", y, wv)
            attn = self._attend(q, k, val, key_bias, scale)
            h = h + jnp.einsum("BTNH,NHD->BTD", attn, wo)
            y = _rms_norm(h, ffn_norm, eps)
            mlp = jax.nn.silu(jnp.einsum("BTD,DF->BTF", y, gate)) * jnp.einsum(
                "BTD,DF->BTF", y, up)
            return h + jnp.einsum("BTF,FD->BTD", mlp, down), None

        with jax.named_scope("vision_tower"):
            x, _ = jax.lax.scan(layer, x, weights)
        return x

    def _attend(self, q_btnh: jax.Array, k_bsnh: jax.Array, v_bsnh: jax.Array,
                key_bias: jax.Array, scale: float) -> jax.Array:
        """Full attention over the image's patches, queries in chunks of `query_chunk`."""

        def chunk(q: jax.Array) -> jax.Array:
            scores = jnp.einsum("BTNH,BSNH->BNTS", q, k_bsnh, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(scores * scale + key_bias, axis=-1).astype(v_bsnh.dtype)
            return jnp.einsum("BNTS,BSNH->BTNH", probs, v_bsnh)

        b, t, n, h = q_btnh.shape
        size = math.gcd(t, self.query_chunk)  # buckets are 4..7 x 2^k: a power-of-two divisor
        if t <= self.query_chunk or size < self.query_chunk // 4:
            return chunk(q_btnh)
        chunks = q_btnh.reshape(b, t // size, size, n, h).swapaxes(0, 1)
        return jax.lax.map(chunk, chunks).swapaxes(0, 1).reshape(b, t, n, h)

    def project(self, hidden_btd: jax.Array, merge_bm4: jax.Array) -> jax.Array:
        """Tower output -> image-token features [B, M, E] (float32 of the vision dtype).

        merge_bm4: int [B, M, 4], the patches of each merged cell in (row, column) order of the
        2x2 window; the merged vector is channel-major (torch unfold): v[c * 4 + ky * 2 + kx].
        """
        b, m, _ = merge_bm4.shape
        d = hidden_btd.shape[-1]
        x = _rms_norm(hidden_btd, self.proj_norm_d[...], self.text_eps)
        cells = jnp.take_along_axis(x, merge_bm4.reshape(b, m * 4)[:, :, None], axis=1)
        cells = cells.reshape(b, m, 4, d).transpose(0, 1, 3, 2).reshape(b, m, 4 * d)
        merged = jnp.einsum("BMK,KD->BMD", cells, self.merge_kd[...])
        act = jax.nn.gelu(jnp.einsum("BMD,DE->BME", merged, self.linear_1_de[...]),
                          approximate=self.mm.projector_hidden_act != "gelu")
        return jnp.einsum("BME,EF->BMF", act, self.linear_2_ee[...])


def patch_bucket(num_patches: int) -> int:
    """The smallest 4/5/6/7 x 2^k >= num_patches: at most 25% padding, few programs."""
    if num_patches <= 4:
        return 4
    k = 0
    while True:
        for base in (4, 5, 6, 7):
            if base << k >= num_patches:
                return base << k
        k += 1


def check_images(images: Sequence[np.ndarray], mm: MultimodalConfig, where: str = "images"
                 ) -> list[np.ndarray]:
    """Each image as float32 [C, H, W] with H and W multiples of 28; ImageError otherwise."""
    out = []
    step, channels = mm.token_pixels, mm.vision.num_channels
    for i, image in enumerate(images):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[0] != channels:
            raise ImageError(f"{where}[{i}] has shape {array.shape}; expected [{channels}, H, W] "
                             "(as nld_jax.load_image returns)")
        _, height, width = array.shape
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ImageError(f"{where}[{i}] is {height}x{width}; height and width must be "
                             f"positive multiples of {step} (use nld_jax.load_image)")
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageError(f"{where}[{i}] has dtype {array.dtype}; expected float32 "
                             "normalised pixels (use nld_jax.load_image)")
        out.append(np.ascontiguousarray(array, dtype=np.float32))
    return out


def _host_inputs(images: list[np.ndarray], patch: int, bucket: int, batch: int
                 ) -> tuple[np.ndarray, ...]:
    """Patches [B, T, P], rows/cols/valid [B, T], merge indices [B, M, 4] for one bucket."""
    channels = images[0].shape[0]
    patches = np.zeros((batch, bucket, channels * patch * patch), np.float32)
    rows = np.zeros((batch, bucket), np.int32)
    cols = np.zeros((batch, bucket), np.int32)
    valid = np.zeros((batch, bucket), bool)
    merge = np.zeros((batch, bucket // 4, 4), np.int32)
    for b, image in enumerate(images):
        _, height, width = image.shape
        gh, gw = height // patch, width // patch
        grid = image.reshape(channels, gh, patch, gw, patch).transpose(1, 3, 0, 2, 4)
        patches[b, :gh * gw] = grid.reshape(gh * gw, -1)
        rows[b, :gh * gw] = np.repeat(np.arange(gh), gw)
        cols[b, :gh * gw] = np.tile(np.arange(gw), gh)
        valid[b, :gh * gw] = True
        index = np.arange(gh * gw).reshape(gh // 2, 2, gw // 2, 2).transpose(0, 2, 1, 3)
        merge[b, :gh * gw // 4] = index.reshape(-1, 4)
    return patches, rows, cols, valid, merge


@functools.partial(jax.jit, static_argnums=0)
def _encode_bucket(graphdef: nnx.GraphDef, state: nnx.State, patches: jax.Array,
                   rows: jax.Array, cols: jax.Array, valid: jax.Array,
                   merge: jax.Array) -> jax.Array:
    encoder = nnx.merge(graphdef, state)
    return encoder.project(encoder.tower(patches, rows, cols, valid), merge)


def encode_images(encoder: VisionEncoder, images: Sequence[np.ndarray]) -> list[jax.Array]:
    """Preprocessed images -> image-token features, one [h_tok * w_tok, E] array per image.

    Identical images (same content hash) are encoded once. Images are grouped by patch bucket;
    a group's batch is padded to a power of two, so the programs compiled are one per (bucket,
    batch size class).
    """
    images = check_images(images, encoder.mm)
    patch = encoder.mm.vision.patch_size
    graphdef, state = nnx.split(encoder)
    first: dict[tuple[tuple[int, ...], str], int] = {}  # content -> first image holding it
    source = [first.setdefault((image.shape, hashlib.sha256(image.tobytes()).hexdigest()), i)
              for i, image in enumerate(images)]
    groups: dict[int, list[int]] = {}
    for i in sorted(set(source)):
        groups.setdefault(patch_bucket(images[i].shape[1] * images[i].shape[2] // patch ** 2),
                          []).append(i)
    encoded: dict[int, jax.Array] = {}
    for bucket, members in sorted(groups.items()):
        batch = 1 << (len(members) - 1).bit_length()
        inputs = _host_inputs([images[i] for i in members], patch, bucket, batch)
        features = _encode_bucket(graphdef, state, *inputs)
        for b, i in enumerate(members):
            tokens = images[i].shape[1] * images[i].shape[2] // (4 * patch ** 2)
            encoded[i] = features[b, :tokens]
    return [encoded[i] for i in source]


def image_feature_index(tokens: np.ndarray, images: Sequence[Sequence[np.ndarray]],
                        mm: MultimodalConfig) -> np.ndarray:
    """Row of the flat feature array (images concatenated row by row, in prompt order) that
    each prompt position takes, or -1 for a text position: int32 [B, T].

    Checks that row b's image spans are exactly those of its images, in order (start, rows of
    pads each closed by a break, the last by an end), and that no pad stands outside a span.

    Args:
      tokens: int [B, T] prompts (padding anywhere outside the spans).
      images: per row, that row's images ([C, H, W], H and W multiples of 28).
    """
    tokens = np.asarray(tokens)
    if len(images) != tokens.shape[0]:
        raise ImageError(f"images has {len(images)} rows but the batch has {tokens.shape[0]}")
    index = np.full(tokens.shape, -1, np.int32)
    next_row = 0
    for b, row_images in enumerate(images):
        row = tokens[b]
        starts = np.flatnonzero(row == mm.image_start_token_id)
        if len(starts) != len(row_images):
            raise ImageError(f"prompt {b} has {len(starts)} image spans (<|image_start|> = "
                             f"{mm.image_start_token_id}) but {len(row_images)} images")
        covered = np.zeros(row.shape, bool)
        for j, (start, image) in enumerate(zip(starts, row_images, strict=True)):
            h_tok, w_tok = image.shape[1] // mm.token_pixels, image.shape[2] // mm.token_pixels
            span = np.asarray(image_token_ids(
                h_tok, w_tok, start_id=mm.image_start_token_id, pad_id=mm.image_token_id,
                break_id=mm.image_break_token_id, end_id=mm.image_end_token_id))
            found = row[start:start + len(span)]
            if len(found) != len(span) or not (found == span).all():
                raise ImageError(f"prompt {b}, image {j}: the span at position {start} is not "
                                 f"the {h_tok}x{w_tok}-token layout of an image of "
                                 f"{image.shape[1]}x{image.shape[2]} pixels")
            pads = start + np.flatnonzero(span == mm.image_token_id)
            index[b, pads] = next_row + np.arange(len(pads), dtype=np.int32)
            next_row += len(pads)
            covered[start:start + len(span)] = True
        stray = np.flatnonzero((row == mm.image_token_id) & ~covered)
        if len(stray):
            raise ImageError(f"prompt {b}: <|image_pad|> ({mm.image_token_id}) at position "
                             f"{int(stray[0])} outside any image span")
    return index


def prepare_images(encoder: VisionEncoder | None, config: NLDConfig, tokens: np.ndarray,
                   images: Sequence[Sequence[np.ndarray]] | None
                   ) -> tuple[jax.Array, jax.Array] | None:
    """Host side of a batch's images: checked, encoded (one program per patch bucket), indexed.

    Args:
      encoder: the model's vision encoder (None for a text-only model).
      tokens: int [B, T] prompts (right padding allowed).
      images: per row, a list of that row's images in prompt order ([] for none), or None.
    Returns:
      None when there is no image, else (features [F, E] float, F padded to a power of two
      so that similar requests share programs; feature_index int32 [B, T]) for
      NLDModel.forward(images=...).
    Raises:
      ImageError: images for a text-only model, a row count or span layout that does not match,
        image spans in a prompt without images, or a bad image.
    """
    tokens = np.asarray(tokens)
    if images is None:
        if config.multimodal is not None and (tokens == config.multimodal.image_token_id).any():
            raise ImageError("the prompts hold <|image_pad|> tokens but no images were passed "
                             "(images=[[...], ...], one list per prompt)")
        return None
    if encoder is None or config.multimodal is None:
        raise ImageError("images were passed to a text-only model (its config.json has no "
                         "vision_config)")
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or any(
            isinstance(row, np.ndarray) or not isinstance(row, Sequence) for row in images):
        raise ImageError("images must be a list with one list of images per prompt, e.g. "
                         "[[image], []]")
    rows = [check_images(row, config.multimodal, where=f"images[{b}]")
            for b, row in enumerate(images)]
    index = image_feature_index(tokens, rows, config.multimodal)
    flat = [image for row in rows for image in row]
    if not flat:
        return None
    features = jnp.concatenate(encode_images(encoder, flat))
    count = features.shape[0]
    features = jnp.pad(features, ((0, (1 << (count - 1).bit_length()) - count), (0, 0)))
    return features, jnp.asarray(index)


def embed_with_images(embeds_btd: jax.Array, features_fe: jax.Array,
                      feature_index_bt: jax.Array) -> jax.Array:
    """Text embeddings with the image-pad rows replaced by image features.

    Args:
      embeds_btd: the token embeddings [B, T, E].
      features_fe: every image's features, concatenated [F, E] (any float dtype).
      feature_index_bt: int [B, T], the row of features_fe for an image pad, -1 elsewhere.
    """
    rows = jnp.take(features_fe, jnp.maximum(feature_index_bt, 0), axis=0)
    return jnp.where((feature_index_bt >= 0)[..., None], rows.astype(embeds_btd.dtype),
                     embeds_btd)


# Stands for one image in the rendered chat text; split out before tokenizing, so it never
# reaches the tokenizer (the released template's own marker string is an open question).
_IMAGE_MARKER = "\x00nld-image\x00"


def _image_source(item: dict[str, Any], where: str) -> Any:
    """The image of one content item: {"type": "image", "image": path|array|PIL} or
    {"type": "image_url", "image_url": {"url": path or file:// URL}}."""
    if item.get("type") == "image":
        source = item.get("image", item.get("path", item.get("url")))
    else:
        url = item.get("image_url")
        source = url.get("url") if isinstance(url, dict) else url
        if isinstance(source, str) and source.startswith("file://"):
            source = source[len("file://"):]
        elif isinstance(source, str) and "://" in source:
            raise ImageError(f"{where}: {source!r}: only local files are read (no downloads)")
    if source is None:
        raise ImageError(f"{where}: an image item without an image")
    return source


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], mm: MultimodalConfig, *,
                enable_thinking: bool = False, add_generation_prompt: bool = True
                ) -> tuple[list[int], list[np.ndarray]]:
    """Messages whose content may list images -> (prompt ids, the images in prompt order).

    Content is a string, or a list of {"type": "text", "text": ...} and image items
    ({"type": "image", "image": path | array | PIL image} or {"type": "image_url",
    "image_url": {"url": path or file:// URL}}). Each image is loaded with `load_image`
    (the config's max_image_size and background) and stands in the text as its span:
    <|image_start|>, rows of <|image_pad|> closed by <|image_break|>, <|image_end|>.
    """
    images: list[np.ndarray] = []
    flat = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for i, item in enumerate(content):
                where = f"messages[{m}].content[{i}]"
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    parts.append(item.get("text", ""))
                elif kind in ("image", "image_url"):
                    source = _image_source(item, where)
                    if isinstance(source, str):
                        source = os.path.expanduser(source)
                    images.append(load_image(source, max_image_size=mm.max_image_size,
                                             background=mm.image_background))
                    parts.append(_IMAGE_MARKER)
                else:
                    raise ValueError(f"{where}: content items are {{'type': 'text' | 'image' | "
                                     f"'image_url', ...}}, got {item!r:.80}")
            message = {**message, "content": "".join(parts)}
        flat.append(message)
    text = tokenizer.render_chat(flat, enable_thinking=enable_thinking,
                                 add_generation_prompt=add_generation_prompt)
    pieces = text.split(_IMAGE_MARKER)
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the chat template kept {len(pieces) - 1} of {len(images)} images")
    ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    for image, piece in zip(images, pieces[1:], strict=True):
        ids += image_token_ids(image.shape[1] // mm.token_pixels, image.shape[2] // mm.token_pixels,
                               start_id=mm.image_start_token_id, pad_id=mm.image_token_id,
                               break_id=mm.image_break_token_id, end_id=mm.image_end_token_id)
        ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids, images
