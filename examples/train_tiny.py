"""Train the bundled tiny NLD model from scratch on CPU (a few minutes on 2 cores).

    python examples/train_tiny.py --out nld_jax/assets/tiny

Trains a ~1.5M-parameter network with the joint AR + block-diffusion objective on the synthetic
sort/reverse tasks of `nld_jax.tiny`, then the LinearSpec draft adapter (LoRA on o_proj, base
frozen), and writes the released Hugging Face layout: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json and linear_spec_lora/. A loss log (train_log.csv) goes
beside it, and the held-out accuracy of each decoding mode is printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import nld_jax
from nld_jax import tiny
from nld_jax.loading import save_model
from nld_jax.model import NLDModel
from nld_jax.train import TrainConfig, Trainer

CONFIG = nld_jax.NLDConfig(
    vocab_size=len(tiny.VOCAB), hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, intermediate_size=512, max_position_embeddings=512,
    rope_theta=1e4, rope_factor=1.0, original_max_position_embeddings=512,
    llama_4_scaling_beta=0.1, bos_token_id=tiny.BOS, eos_token_ids=(tiny.EOS,),
    mask_token_id=tiny.MASK, block_size=8, dlm_paradigm="block_diff")


def train(trainer: Trainer, steps: int, batch: int, seed: int, log: csv.writer,
          phase: str) -> None:
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc=phase, unit="step")
    for step in bar:
        tokens, loss_mask = tiny.make_batch(rng, batch)
        metrics = trainer.step(tokens, loss_mask, jax.random.key(seed * 100003 + step))
        log.writerow([phase, step, *(f"{metrics[k]:.4f}" for k in
                                     ("loss", "ar_loss", "diffusion_loss"))])
        bar.set_postfix(ar=f"{metrics['ar_loss']:.3f}", diff=f"{metrics['diffusion_loss']:.3f}")


def evaluate(model: NLDModel, count: int, seed: int) -> None:
    """Held-out accuracy and tokens per forward of every mode."""
    rng = np.random.default_rng(seed)
    examples = [tiny.make_example(rng) for _ in range(count)]
    prompts = [p for p, _ in examples]
    for mode in ("ar", "diffusion", "self_spec"):
        start = time.perf_counter()
        out = nld_jax.generate(model, prompts, mode=mode, max_new_tokens=16)
        seconds = time.perf_counter() - start
        correct = sum(o == a for o, (_, a) in zip(out.tokens, examples, strict=True))
        print(f"{mode:10s} accuracy {correct / count:.3f}  tokens/forward "
              f"{out.stats['tokens_per_forward']:.2f}  {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(tiny.TINY_MODEL_DIR))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = NLDModel(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    print(f"{CONFIG.num_parameters / 1e6:.2f}M parameters, block size {CONFIG.block_size}")
    with open(out / "train_log.csv", "w", newline="") as f:
        log = csv.writer(f)
        log.writerow(["phase", "step", "loss", "ar_loss", "diffusion_loss"])
        base = Trainer(model, TrainConfig(learning_rate=2e-3, warmup_steps=args.steps // 15,
                                          total_steps=args.steps))
        train(base, args.steps, args.batch, args.seed, log, "base")
        model = base.model
        if args.lora_steps:
            model.attach_lora(rank=8, scale=2.0, rngs=nnx.Rngs(args.seed + 1))
            adapter = Trainer(model, TrainConfig(learning_rate=1e-3,
                                                 warmup_steps=args.lora_steps // 15,
                                                 total_steps=args.lora_steps, lora_only=True))
            train(adapter, args.lora_steps, args.batch, args.seed + 1, log, "lora")
            model = adapter.model

    save_model(model, out)
    tiny.build_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}, indent=2) + "\n")
    print(f"wrote {out}")
    evaluate(nld_jax.load_model(out, dtype="float32"), count=200, seed=12345)


if __name__ == "__main__":
    main()
