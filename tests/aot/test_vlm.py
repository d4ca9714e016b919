"""The VLM-8B image path compiled for an H100 without one: the vision encoder for a 1400x1400
image and the prefill of its ~2.5k image tokens, with the memory XLA plans for each."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nld_jax
from nld_jax import aot
from nld_jax.vision import patch_bucket

GIB = 1 << 30
SIDE = 1400  # max_image_size: the largest image, 50 x 50 tokens


@pytest.fixture(scope="module")
def vlm8b() -> tuple[nld_jax.NLDConfig, nnx.GraphDef, nnx.State]:
    config = nld_jax.NLDConfig.preset("VLM-8B")
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: nld_jax.NLDModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    return config, graphdef, state


def _struct(shape: tuple[int, ...], dtype: jnp.dtype, mesh: jax.sharding.Mesh
            ) -> jax.ShapeDtypeStruct:
    return aot.abstract(jax.ShapeDtypeStruct(shape, dtype), mesh)


def test_vlm8b_image_prefill_compiles_for_h100(vlm8b):
    config, graphdef, state = vlm8b
    mm = config.multimodal
    mesh = aot.target_mesh("h100")
    tokens_side = SIDE // mm.token_pixels
    image_tokens = tokens_side ** 2
    patches = image_tokens * 4
    bucket = patch_bucket(patches)
    assert (image_tokens, bucket) == (2500, 10240)

    vision_graph, vision_state = nnx.split(nnx.merge(graphdef, state).vision)

    def encode(params, patch_rows, rows, cols, valid, merge):
        encoder = nnx.merge(vision_graph, params)
        return encoder.project(encoder.tower(patch_rows, rows, cols, valid), merge)

    p = mm.vision.num_channels * mm.vision.patch_size ** 2
    encoder = aot.compile_program(
        encode, aot.abstract(vision_state, mesh), _struct((1, bucket, p), jnp.float32, mesh),
        _struct((1, bucket), jnp.int32, mesh), _struct((1, bucket), jnp.int32, mesh),
        _struct((1, bucket), jnp.bool_, mesh), _struct((1, bucket // 4, 4), jnp.int32, mesh))

    # The prompt: the image's span (1 + 50 * 51 tokens) and some text, in generate's bucket;
    # the features padded to a power of two, as vision.prepare_images does.
    span = 1 + tokens_side * (tokens_side + 1)
    prompt = 1 << (span + 32 - 1).bit_length()
    features = 1 << (image_tokens - 1).bit_length()

    def prefill(params, tokens, image_features, feature_index):
        model = nnx.merge(graphdef, params)
        hidden, block_kv = model.forward(tokens, None, causal=True,
                                         images=(image_features, feature_index))
        return model.logits(hidden[:, -1:]), block_kv

    program = aot.compile_program(
        prefill, aot.abstract(state, mesh), _struct((1, prompt), jnp.int32, mesh),
        _struct((features, config.hidden_size), jnp.float32, mesh),
        _struct((1, prompt), jnp.int32, mesh))
    # The prefill's arguments: the text weights (bf16; jit drops the unused vision ones) and
    # the image features (float32).
    text_weights = (config.num_parameters - mm.num_parameters(config.hidden_size)) * 2
    expected = text_weights + features * config.hidden_size * 4
    assert abs(program.argument_bytes - expected) < 0.02 * expected
    vision_weights = mm.num_parameters(config.hidden_size) * 4
    assert abs(encoder.argument_bytes - vision_weights) < 0.05 * vision_weights
    total = program.argument_bytes + program.temp_bytes
    print(f"\nVLM-8B on H100, one {SIDE}x{SIDE} image ({image_tokens} tokens, {bucket} patches):"
          f"\n  vision encoder: temp {encoder.temp_bytes / GIB:.2f} GiB beyond "
          f"{encoder.argument_bytes / GIB:.2f} GiB of arguments, compiled in "
          f"{encoder.compile_s:.0f} s"
          f"\n  prefill of {prompt} positions: arguments {program.argument_bytes / GIB:.2f} GiB "
          f"(weights), temp {program.temp_bytes / GIB:.2f} GiB, compiled in "
          f"{program.compile_s:.0f} s")
    assert total < aot.TARGETS["h100"].device_memory
    assert encoder.argument_bytes + encoder.temp_bytes < aot.TARGETS["h100"].device_memory
