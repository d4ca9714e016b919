"""Train the bundled tiny NLD model from scratch on CPU (a few minutes on 2 cores).

    python examples/train_tiny.py --out my_tiny [--overwrite]

Trains a ~1.5M-parameter network with the joint AR + block-diffusion objective on the synthetic
sort/reverse tasks of `nld_jax.tiny`, then the LinearSpec draft adapter (LoRA on o_proj, base
frozen), and writes the released Hugging Face layout: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja and linear_spec_lora/, with the loss
log (train_log.csv), all at once (save_model replaces the directory atomically). The held-out
accuracy of each decoding mode is printed at the end. It refuses to write into the package's
own bundled model; to update that, train elsewhere and copy the files over deliberately.
"""

from __future__ import annotations

import csv
import io
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import nld_jax
from nld_jax import atomic, tiny
from nld_jax.cli import OneLineParser, UsageError
from nld_jax.loading import save_model
from nld_jax.model import NLDModel
from nld_jax.tokenizer import Tokenizer
from nld_jax.train import TrainConfig, Trainer

CONFIG = nld_jax.NLDConfig(
    vocab_size=len(tiny.VOCAB), hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, intermediate_size=512, max_position_embeddings=512,
    rope_theta=1e4, rope_factor=1.0, original_max_position_embeddings=512,
    llama_4_scaling_beta=0.1, bos_token_id=tiny.BOS, eos_token_ids=(tiny.EOS,),
    mask_token_id=tiny.MASK, block_size=8, dlm_paradigm="block_diff")
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                    "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}


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


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="a new directory for the model (not the package's own assets)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (once the new model is complete)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    try:
        args = parser.parse_args(argv)
        out = pathlib.Path(args.out).resolve()
        assets = tiny.TINY_MODEL_DIR.resolve().parent
        if out == assets or assets in out.parents:
            raise UsageError(f"--out {out} is inside the package's bundled assets {assets}; "
                             "train into a new directory (copy it there deliberately if needed)")
        if args.steps <= 0 or args.lora_steps < 0 or args.batch <= 0:
            raise UsageError("--steps and --batch must be positive, --lora-steps >= 0")
        atomic.check_destination(str(out), args.overwrite)  # before minutes of training
    except (UsageError, OSError) as e:
        print(f"train_tiny.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    model = NLDModel(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    print(f"{CONFIG.num_parameters / 1e6:.2f}M parameters, block size {CONFIG.block_size}")
    log_text = io.StringIO()
    log = csv.writer(log_text, lineterminator="\n")
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

    tokenizer = Tokenizer(tiny.build_tokenizer(), TOKENIZER_CONFIG, tiny.CHAT_TEMPLATE)
    save_model(model, out, overwrite=args.overwrite, tokenizer=tokenizer,
               extra_files={"train_log.csv": log_text.getvalue()})
    print(f"wrote {out}")
    evaluate(nld_jax.load_model(out, dtype="float32"), count=200, seed=12345)
    return 0


if __name__ == "__main__":
    sys.exit(main())
