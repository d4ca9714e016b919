"""Images in, every decoding mode out: a random tiny VLM checkpoint run on a real image file.

    python examples/vlm.py [--image examples/images/house.png] [--max-new-tokens 16]

Builds a test-sized Nemotron-Labs-Diffusion-VLM (random weights: the tokens are meaningless,
the plumbing is real), writes it in the released layout, loads it back with load_model, then
preprocesses the image, lays out its prompt span and generates with every mode. Greedy
self-speculation must reproduce greedy AR exactly, image or not; the script checks that.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from flax import nnx

import nld_jax
from nld_jax.config import MultimodalConfig, NLDConfig, VisionConfig
from nld_jax.image import image_token_ids
from nld_jax.loading import save_model


def tiny_vlm_config() -> NLDConfig:
    """The tiny text preset behind a 2-layer, 32-wide Pixtral tower; images capped at 224 px."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, head_dim=8)
    return NLDConfig.preset("tiny", multimodal=MultimodalConfig(vision=vision,
                                                                max_image_size=224))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="examples/images/house.png")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    config = tiny_vlm_config()
    mm = config.multimodal
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = os.path.join(scratch, "tiny-vlm")
        save_model(nld_jax.NLDModel(config, dtype="float32", rngs=nnx.Rngs(0)), checkpoint,
                   dtype="float32")
        model = nld_jax.load_model(checkpoint, dtype="float32")

    image = nld_jax.load_image(args.image, max_image_size=mm.max_image_size,
                               background=mm.image_background)
    h_tok, w_tok = image.shape[1] // mm.token_pixels, image.shape[2] // mm.token_pixels
    span = image_token_ids(h_tok, w_tok, start_id=mm.image_start_token_id,
                           pad_id=mm.image_token_id, break_id=mm.image_break_token_id,
                           end_id=mm.image_end_token_id)
    prompt = [config.bos_token_id, 5, 6] + span + [7, 8]
    print(f"{args.image}: preprocessed to {image.shape[2]}x{image.shape[1]} px, "
          f"{h_tok}x{w_tok} image tokens; prompt {len(prompt)} tokens")

    outputs = {}
    for mode in nld_jax.MODES:
        start = time.perf_counter()
        out = nld_jax.generate(model, [prompt], images=[[image]], mode=mode,
                               max_new_tokens=args.max_new_tokens, block_size=4,
                               eos_token_ids=[config.vocab_size - 1])
        seconds = time.perf_counter() - start
        outputs[mode] = out.tokens[0]
        print(f"{mode:<20} {out.tokens[0]}  {out.stats['tokens_per_forward']:.2f} "
              f"tokens/forward  ({seconds:.1f} s incl. compile)")
    for mode in ("self_spec", "self_spec_quadratic"):
        if outputs[mode] != outputs["ar"]:
            raise SystemExit(f"greedy {mode} differs from greedy AR with an image")
    print("greedy self_spec and self_spec_quadratic == greedy ar: True")


if __name__ == "__main__":
    main()
