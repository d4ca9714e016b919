"""Generate the VLM oracle fixture under ``tests/fixtures/vlm/`` (spec/vlm.md section 8).

The oracle is transformers' ``Mistral3ForConditionalGeneration`` (Pixtral vision tower, Mistral3
projector, Ministral3 text decoder) at tiny random sizes, renamed into the NLD VLM layout
(``encoder.vision_tower.*``, ``encoder.multi_modal_projector.*``, ``encoder.*``,
``diffusion_head.weight``) with an NLD VLM ``config.json``. ``golden.npz`` holds:

* ``image_a`` float32 [3, 56, 84] and ``image_b`` [3, 28, 56] (random pixels, already
  "preprocessed"); ``tower_a`` [24, 32] / ``tower_b`` [8, 32]: the tower's last hidden state of
  each image encoded alone (checked here equal to HF's padded two-image batch with its
  block-diagonal mask); ``features_a`` [6, 64] / ``features_b`` [2, 64]: the projector output;
* ``ids_one`` / ``logits_one`` [T, V]: one image in the prompt; ``ids_two`` / ``logits_two``:
  image a then image b; causal forward, float32;
* ``ar_tokens`` [16]: greedy new tokens of ``ids_one`` with the KV cache (``generate``), checked
  against a no-cache argmax loop;
* ``decode.json``: greedy block diffusion (and LinearSpec self-speculation without an adapter,
  which must equal the AR tokens) with ``ids_one``, by ``torch_decoding`` fed the spliced
  embeddings (the text oracle with the image pads replaced by ``features_a``).

Every parameter is rounded to bfloat16 before the float32 reference runs; the checkpoint is bf16.

Run from the repository root with the interpreter that has torch and transformers::

    python3 tests/reference/make_vlm_golden.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, Mistral3Config, Mistral3ForConditionalGeneration

try:  # run as a script: tests/reference is on sys.path
    import torch_decoding as td
except ModuleNotFoundError:
    from tests.reference import torch_decoding as td

OUT_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "vlm"
START, PAD, BREAK, END = 18, 19, 20, 21
BOS, EOS, MASK = 1, 11, 100
AR_NEW_TOKENS = 16
DECODE_NEW_TOKENS = 16
STD = {"vision": 0.05, "projector": 0.1, "text": 0.02, "qk": 0.25}
ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}


def hf_config() -> Mistral3Config:
    return Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, head_dim=8, patch_size=14,
                           image_size=1540, num_channels=3, hidden_act="silu",
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        text_config=dict(model_type="ministral3", vocab_size=128, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_parameters=dict(ROPE)),
        image_token_index=PAD, spatial_merge_size=2, projector_hidden_act="gelu",
        multimodal_projector_bias=False, vision_feature_layer=-1, tie_word_embeddings=False)


def nld_config() -> dict:
    """The NLD VLM config.json: text fields at the root, the tower nested."""
    return {
        "architectures": ["NemotronLabsDiffusionVLMModel"],
        "model_type": "nemotron_labs_diffusion_vlm",
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS,
        "mask_token_id": MASK, "block_size": 8, "dlm_paradigm": "bidirectional",
        "rope_parameters": dict(ROPE),
        "vision_config": {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8,
                          "patch_size": 14, "image_size": 1540, "num_channels": 3,
                          "hidden_act": "silu",
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        "spatial_merge_size": 2, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False, "vision_feature_layer": -1,
        "image_token_index": 10,  # the released model code ignores it (class constant 19)
        "torch_dtype": "bfloat16",
    }


def init_params(model: torch.nn.Module, seed: int) -> None:
    """normal weights (std by part), 1 + 0.1 * normal for norms; every value rounded to bf16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim == 1:
                value = 1.0 + 0.1 * noise
            elif "vision_tower" in name:
                value = STD["vision"] * noise
            elif "multi_modal_projector" in name:
                value = STD["projector"] * noise
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                value = STD["qk"] * noise
            else:
                value = STD["text"] * noise
            param.copy_(value.to(torch.bfloat16).to(torch.float32))


def rename(name: str) -> str:
    for old, new in (("model.language_model.", "encoder."),
                     ("model.vision_tower.", "encoder.vision_tower."),
                     ("model.multi_modal_projector.", "encoder.multi_modal_projector."),
                     ("lm_head.", "diffusion_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"unexpected parameter {name}")


def image_span(height: int, width: int) -> list[int]:
    h_tok, w_tok = height // 28, width // 28
    span = [START]
    for row in range(h_tok):
        span += [PAD] * w_tok + [END if row == h_tok - 1 else BREAK]
    return span


class SplicedLM(torch.nn.Module):
    """The text oracle with the prompt's image pads replaced by image features.

    torch_decoding calls ``model(input_ids=..., attention_mask=..., position_ids=...)`` on
    sequences that start at position 0 with the prompt; the pads of the PROMPT (never a generated
    token that happens to equal the pad id) take the features, in order.
    """

    def __init__(self, model: Mistral3ForConditionalGeneration, prompt: list[int],
                 features: torch.Tensor):
        super().__init__()
        self.model = model
        self.pads = [i for i, t in enumerate(prompt) if t == PAD]
        assert len(self.pads) == features.shape[0]
        self.features = features

    def forward(self, input_ids: torch.Tensor, **kwargs):
        embeds = self.model.get_input_embeddings()(input_ids).clone()
        covered = [p for p in self.pads if p < input_ids.shape[1]]
        assert len(covered) in (0, len(self.pads)), "a sequence cut through the image"
        if covered:
            embeds[0, covered] = self.features.to(embeds.dtype)
        return self.model(inputs_embeds=embeds, **kwargs)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(hf_config()).eval()
    model.set_attn_implementation("eager")
    init_params(model, seed=1)
    gen = torch.Generator().manual_seed(2)
    image_a = torch.randn((3, 56, 84), generator=gen)
    image_b = torch.randn((3, 28, 56), generator=gen)

    # Tower and projector, each image alone, and HF's padded two-image batch.
    towers, features = [], []
    for image in (image_a, image_b):
        size = torch.tensor([image.shape[1:]])
        towers.append(model.model.vision_tower(image[None], image_sizes=size).last_hidden_state[0])
        features.append(model.model.get_image_features(
            pixel_values=image[None], image_sizes=size, return_dict=True).pooler_output[0])
    batch = torch.zeros((2, 3, 56, 84))
    batch[0], batch[1, :, :28, :56] = image_a, image_b
    sizes = torch.tensor([[56, 84], [28, 56]])
    joint = model.model.vision_tower(batch, image_sizes=sizes).last_hidden_state[0]
    torch.testing.assert_close(joint, torch.cat(towers), rtol=0, atol=1e-5)
    joint_features = model.model.get_image_features(pixel_values=batch, image_sizes=sizes,
                                                    return_dict=True).pooler_output
    torch.testing.assert_close(torch.cat(list(joint_features)), torch.cat(features), rtol=0,
                               atol=1e-5)

    span_a, span_b = image_span(56, 84), image_span(28, 56)
    ids_one = [BOS, 5, 6] + span_a + [7, 8]
    ids_two = [BOS, 5] + span_a + [6] + span_b + [7, 8]
    logits_one = model(input_ids=torch.tensor([ids_one]), pixel_values=image_a[None],
                       image_sizes=torch.tensor([[56, 84]])).logits[0]
    logits_two = model(input_ids=torch.tensor([ids_two]), pixel_values=batch,
                       image_sizes=sizes).logits[0]
    # The image must matter: the same prompt with the pads' text embeddings differs clearly.
    text_only = model(input_ids=torch.tensor([ids_one])).logits[0]
    assert (text_only - logits_one).abs().max() > 0.05, "the image barely changes the logits"

    # Greedy AR with the KV cache, then the no-cache loop through the spliced text oracle.
    spliced = SplicedLM(model, ids_one, features[0])
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=AR_NEW_TOKENS, eos_token_id=128,
                               pad_token_id=0, bos_token_id=BOS, use_cache=True)
    ar = model.generate(input_ids=torch.tensor([ids_one]), pixel_values=image_a[None],
                        image_sizes=torch.tensor([[56, 84]]), generation_config=gen_cfg)
    ar_tokens = ar[0, len(ids_one):].tolist()
    assert len(ar_tokens) == AR_NEW_TOKENS
    assert td.ar_generate(spliced, ids_one, max_new_tokens=AR_NEW_TOKENS,
                          eos_token_id=-1) == ar_tokens
    np.testing.assert_allclose(
        td.forward_logits(spliced, [], ids_one, bidirectional=False), logits_one.numpy(),
        rtol=0, atol=1e-5)

    runs = []
    for block in (4, 8):
        for threshold, steps in ((0.9, None), (None, 4)):
            res = td.diffusion_generate(spliced, ids_one, block_size=block, threshold=threshold,
                                        steps_per_block=steps, max_new_tokens=DECODE_NEW_TOKENS,
                                        eos_token_id=-1, mask_token_id=MASK)
            runs.append({"mode": "diffusion", "block_size": block, "threshold": threshold,
                         "steps_per_block": steps, "max_new_tokens": DECODE_NEW_TOKENS,
                         "tokens": res.tokens, "num_forwards": res.num_forwards})
        spec = td.self_spec_generate(spliced, spliced, ids_one, block_size=block,
                                     max_new_tokens=DECODE_NEW_TOKENS, eos_token_id=-1,
                                     mask_token_id=MASK)
        assert spec.tokens == ar_tokens[:DECODE_NEW_TOKENS], "self-spec != greedy AR"
        runs.append({"mode": "self_spec", "block_size": block, "max_new_tokens":
                     DECODE_NEW_TOKENS, "tokens": spec.tokens, "num_forwards": spec.num_forwards})

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    tensors = {rename(k): v.detach().to(torch.bfloat16).contiguous().clone()
               for k, v in model.named_parameters()}
    assert len(tensors) == 45, len(tensors)
    save_file(tensors, str(OUT_DIR / "model.safetensors"), metadata={"format": "pt"})
    (OUT_DIR / "config.json").write_text(json.dumps(nld_config(), indent=2) + "\n")
    np.savez_compressed(
        OUT_DIR / "golden.npz",
        image_a=image_a.numpy(), image_b=image_b.numpy(),
        tower_a=towers[0].numpy(), tower_b=towers[1].numpy(),
        features_a=features[0].numpy(), features_b=features[1].numpy(),
        ids_one=np.array(ids_one, np.int32), logits_one=logits_one.numpy(),
        ids_two=np.array(ids_two, np.int32), logits_two=logits_two.numpy(),
        ar_tokens=np.array(ar_tokens, np.int32))
    with open(OUT_DIR / "decode.json", "w", encoding="utf-8") as f:
        json.dump({"prompt": "ids_one", "mask_token_id": MASK, "eos_token_id": None,
                   "runs": runs}, f)
        f.write("\n")
    (OUT_DIR / "README.md").write_text(
        "# VLM oracle fixture\n\nMade by `python3 tests/reference/make_vlm_golden.py` (do not "
        f"edit by hand) with transformers {transformers.__version__} and torch "
        f"{torch.__version__}: `Mistral3ForConditionalGeneration` at tiny random sizes "
        "(spec/vlm.md section 8), renamed into the NLD VLM layout. See the script's docstring "
        "for every array. decode.json: greedy diffusion and self-speculation (no adapter) runs "
        "of `ids_one`, no EOS, by tests/reference/torch_decoding.py fed the spliced "
        "embeddings.\n")
    print("wrote", OUT_DIR, "runs:", [(r["mode"], r["block_size"], r["tokens"][:6]) for r in runs])


if __name__ == "__main__":
    main()
