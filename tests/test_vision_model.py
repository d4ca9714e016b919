"""The VLM end to end against transformers: loading, prefill logits, every decoding mode.

Fixture: tests/fixtures/vlm (tests/reference/make_vlm_golden.py): a tiny Mistral3 VLM renamed
into the NLD layout, its logits with one and two images, greedy AR tokens with an image, and
greedy diffusion / self-speculation by the text oracle fed the spliced embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nld_jax
from convert import hf_to_orbax
from nld_jax.image import ImageError
from nld_jax.loading import LoadError, save_model
from nld_jax.vision import encode_images

VLM_DIR = pathlib.Path(__file__).parent / "fixtures" / "vlm"
GOLDEN_DIR = pathlib.Path(__file__).parent / "fixtures" / "golden" / "gqa4_theta1e6"
F32_TOL = 1e-5  # float32 logits vs transformers float32


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(VLM_DIR / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["runs"] = json.loads((VLM_DIR / "decode.json").read_text())["runs"]
    used = set(arrays["ar_tokens"].tolist())
    for run in arrays["runs"]:
        used.update(run["tokens"])
    arrays["eos"] = min(set(range(128)) - used)  # the oracle ran without an EOS
    return arrays


@pytest.fixture(scope="module")
def model() -> nld_jax.NLDModel:
    return nld_jax.load_model(VLM_DIR, dtype="float32")


def test_prefill_logits_with_one_and_two_images(model, golden):
    one = model(jnp.asarray(golden["ids_one"])[None], images=[[golden["image_a"]]])
    np.testing.assert_allclose(np.asarray(one[0]), golden["logits_one"], rtol=0, atol=F32_TOL)
    two = model(jnp.asarray(golden["ids_two"])[None],
                images=[[golden["image_a"], golden["image_b"]]])
    np.testing.assert_allclose(np.asarray(two[0]), golden["logits_two"], rtol=0, atol=F32_TOL)
    # Images in the wrong order do not fit the prompt's spans.
    with pytest.raises(ImageError, match="not the"):
        model(jnp.asarray(golden["ids_two"])[None],
              images=[[golden["image_b"], golden["image_a"]]])


def test_vision_dtype_and_loader_match_the_oracle(model, golden):
    assert model.vision.q_ldnh.dtype == jnp.float32 and model.embed_vd.dtype == jnp.float32
    bf16 = nld_jax.load_model(VLM_DIR, vision_dtype="bfloat16")
    assert bf16.vision.q_ldnh.dtype == jnp.bfloat16 and bf16.embed_vd.dtype == jnp.bfloat16
    features = encode_images(model.vision, [golden["image_a"]])[0]
    np.testing.assert_allclose(np.asarray(features), golden["features_a"], atol=F32_TOL)


@pytest.mark.slow
def test_every_mode_with_an_image_matches_the_oracle(model, golden):
    prompt, image, eos = golden["ids_one"].tolist(), golden["image_a"], [golden["eos"]]
    ar = nld_jax.generate(model, [prompt], images=[[image]], mode="ar", max_new_tokens=16,
                          eos_token_ids=eos)
    assert ar.tokens[0] == golden["ar_tokens"].tolist()
    for run in golden["runs"]:
        if run["mode"] == "diffusion" and run["block_size"] == 8:
            continue  # the block-4 runs cover the mode; block 8 is in the fixture for reference
        kwargs = dict(block_size=run["block_size"])
        if run["mode"] == "diffusion":
            kwargs.update(threshold=run["threshold"], denoise_steps=run["steps_per_block"])
        out = nld_jax.generate(model, [prompt], images=[[image]], mode=run["mode"],
                               max_new_tokens=16, eos_token_ids=eos, **kwargs)
        assert out.tokens[0] == run["tokens"], run
        assert out.num_forwards == run["num_forwards"], run
    # Self-speculation (both kinds) at temperature 0 is greedy AR.
    quadratic = nld_jax.generate(model, [prompt], images=[[image]], mode="self_spec_quadratic",
                                 max_new_tokens=16, block_size=4, eos_token_ids=eos)
    assert quadratic.tokens[0] == golden["ar_tokens"].tolist()


@pytest.mark.slow
def test_ragged_batch_with_and_without_images_and_streaming(model, golden):
    a, b, eos = golden["image_a"], golden["image_b"], [golden["eos"]]
    prompts = [golden["ids_two"].tolist(), [1, 5, 6, 7], golden["ids_one"].tolist()]
    images = [[a, b], [], [a]]
    alone = [nld_jax.generate(model, [p], images=[i], mode="self_spec", max_new_tokens=8,
                              block_size=4, eos_token_ids=eos).tokens[0]
             for p, i in zip(prompts, images, strict=True)]
    assert alone[2] == golden["ar_tokens"][:8].tolist()
    streamed: list[list[int]] = [[], [], []]

    def collect(new: list[list[int]]) -> None:
        for row, tokens in zip(streamed, new, strict=True):
            row.extend(tokens)

    batch = nld_jax.generate(model, prompts, images=images, mode="self_spec", max_new_tokens=8,
                             block_size=4, eos_token_ids=eos, stream=collect)
    assert batch.tokens == alone and streamed == alone


def test_image_errors_come_before_any_device_work(model, golden):
    ids = golden["ids_one"].tolist()
    with pytest.raises(ImageError, match="no images were passed"):
        nld_jax.generate(model, [ids], max_new_tokens=4)
    with pytest.raises(ImageError, match="one list of images per prompt"):
        nld_jax.generate(model, [ids], images=[golden["image_a"]], max_new_tokens=4)
    with pytest.raises(ImageError, match="images has 2 rows"):
        nld_jax.generate(model, [ids], images=[[golden["image_a"]], []], max_new_tokens=4)
    with pytest.raises(ImageError, match="multiples of 28"):
        nld_jax.generate(model, [ids], images=[[np.zeros((3, 56, 80), np.float32)]])
    text = nld_jax.load_model(GOLDEN_DIR, dtype="float32")
    with pytest.raises(ImageError, match="text-only model"):
        text(jnp.asarray([[1, 2, 3]]), images=[[]])


def test_loading_is_strict_and_round_trips(tmp_path, model, golden):
    tensors = load_file(VLM_DIR / "model.safetensors")
    assert sum(k.startswith("encoder.vision_tower.") for k in tensors) == 2 + 2 * 9
    for case, (edit, message) in enumerate([
        (lambda t: t.pop("encoder.vision_tower.transformer.layers.1.ffn_norm.weight"),
         "missing 1 tensor"),
        (lambda t: t.update({"encoder.multi_modal_projector.linear_1.bias":
                             np.zeros(64, np.float32)}), "unexpected tensor"),
        (lambda t: t.update({"encoder.vision_tower.patch_conv.weight":
                             np.zeros((32, 3, 16, 16), np.float32)}), "patch_conv.weight"),
    ]):
        broken = tmp_path / f"broken{case}"
        shutil.copytree(VLM_DIR, broken)
        edited = dict(tensors)
        edit(edited)
        save_file(edited, broken / "model.safetensors")
        with pytest.raises(LoadError, match=message):
            nld_jax.load_model(broken)
    # The released layout written back loads to the same network.
    save_model(model, tmp_path / "saved", dtype="float32")
    again = nld_jax.load_model(tmp_path / "saved", dtype="float32")
    # nld-convert's Orbax copy too.
    hf_to_orbax.convert(VLM_DIR, tmp_path / "orbax", dtype="float32", progress=False)
    orbax = nld_jax.load_model(tmp_path / "orbax", dtype="float32")
    for loaded in (again, orbax):
        assert loaded.config == model.config
        logits = loaded(jnp.asarray(golden["ids_one"])[None], images=[[golden["image_a"]]])
        np.testing.assert_allclose(np.asarray(logits[0]), golden["logits_one"], atol=F32_TOL)


@pytest.mark.slow
def test_vlm_example_runs_every_mode_on_the_committed_image():
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "examples/vlm.py", "--max-new-tokens", "8"],
                            capture_output=True, text=True, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "224x168 px, 6x8 image tokens" in result.stdout
    for mode in nld_jax.MODES:
        assert any(line.startswith(mode + " ") for line in result.stdout.splitlines())
    assert "== greedy ar: True" in result.stdout


def test_cli_image_flag(tmp_path):
    import io

    from flax import nnx

    from nld_jax import cli, tiny
    from nld_jax.config import MultimodalConfig, NLDConfig, VisionConfig

    house = pathlib.Path(__file__).parents[1] / "examples" / "images" / "house.png"
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, head_dim=8)
    config = dataclasses.replace(nld_jax.NLDConfig.from_json(tiny.TINY_MODEL_DIR),
                                 vocab_size=24,  # room for the image ids 18-21
                                 multimodal=MultimodalConfig(vision=vision, max_image_size=112))
    assert isinstance(config, NLDConfig)
    checkpoint = tmp_path / "tiny-vlm"
    save_model(nld_jax.NLDModel(config, dtype="float32", rngs=nnx.Rngs(0)), checkpoint,
               dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny.TINY_MODEL_DIR / name, checkpoint / name)

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(list(argv), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    status, _, err = run(str(checkpoint), "sort 3 1 2", "--image", str(house), "--image",
                         str(house), "--mode", "self_spec", "--dtype", "float32",
                         "--max-new-tokens", "4")
    assert status == 0, err
    assert "tokens/forward" in err
    status, _, err = run(str(checkpoint), "x", "--image", str(tmp_path / "none.png"),
                         "--dtype", "float32")
    assert status == 2 and "no such image file" in err
    status, _, err = run(str(tiny.TINY_MODEL_DIR), "x", "--image", str(house))
    assert status == 2 and "needs a VLM checkpoint" in err


def test_text_only_call_of_a_vlm_under_jit(model):
    import jax

    tokens = jnp.asarray([[1, 5, 6, 7]])
    jitted = jax.jit(lambda t: model(t))(tokens)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(tokens)), atol=F32_TOL)
