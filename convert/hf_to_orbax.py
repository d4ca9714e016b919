"""nld-convert: a released Hugging Face directory -> an Orbax checkpoint that load_model reads.

    nld-convert SRC DST [--dtype bfloat16|float32] [--overwrite] [--no-lora]

The source is read and fully validated by nld_jax.load_model before anything is written. The
output (parameters in the Flax layout and the source's dtype unless --dtype says otherwise, the
LoRA adapter if any, config.json, the tokenizer files and the nld_orbax.json marker) is written
into a temporary sibling of DST and renamed into place at the end (nld_jax.atomic): a failure,
Ctrl-C or crash never leaves a DST that loads half-written, an existing DST stays intact until
the swap, and leftovers of killed runs are removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence

from nld_jax import atomic
from nld_jax.cli import OneLineParser, UsageError, exit_on_interrupt
from nld_jax.model import NLDModel

__all__ = ["convert", "main"]


def _write(model: NLDModel, src: str, tmp: str, dtype: str) -> None:
    """Everything DST will hold, written into `tmp` (the marker last)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from nld_jax import loading
    from nld_jax.tokenizer import TOKENIZER_FILES

    # Uncompressed: weights barely compress (random bf16: 22%), and zstd decompression made
    # loads slower than the safetensors in examples/load_speed.py (OCDBT, Orbax's default, kept).
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.join(tmp, loading.ORBAX_PARAMS),
                          args=ocp.args.PyTreeSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    # The source's own config.json, byte for byte: load_model has validated it.
    for name in ("config.json",) + TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    marker = {"format": loading.ORBAX_FORMAT, "version": loading.ORBAX_VERSION, "dtype": dtype,
              "has_lora": model.has_lora,
              "num_parameters": model.config.num_parameters}
    if model.has_lora:
        lora = model.layers.attn.lora
        marker.update(lora_rank=int(lora.a_nhr.shape[-1]), lora_scale=float(lora.scale))
    with open(os.path.join(tmp, loading.ORBAX_MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes the directory


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
            overwrite: bool = False, lora: bool = True, progress: bool = True) -> None:
    """Converts a released directory to an Orbax directory.

    Args:
      src: the Hugging Face directory (config.json, safetensors, optional linear_spec_lora/),
        or a Hub repo id (see nld_jax.load_model).
      dst: the Orbax directory to create (not inside src).
      dtype: "bfloat16" or "float32", the parameters' dtype in the checkpoint; None keeps the
        source's (bfloat16 when every source tensor is bf16, else float32), so that
        load_model(dst) equals load_model(src).
      overwrite: replace an existing dst (only once the new checkpoint is complete).
      lora: keep the source's LoRA draft adapter (if it has one).
      progress: show a tqdm progress bar on stderr.
    """
    from tqdm import tqdm

    import nld_jax
    from nld_jax.loading import resolve_checkpoint_dir, source_dtype

    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if dtype not in (None, "bfloat16", "float32"):
        raise ValueError(f"{dtype=} is not supported; use 'bfloat16' or 'float32'")
    atomic.clean_stale(dst)  # leftovers of interrupted runs, before the existence check
    atomic.check_destination(dst, overwrite)
    src = resolve_checkpoint_dir(src)  # a Hub repo id: downloaded into the Hub cache first
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
        raise ValueError(f"{dst}: the destination and the source {src} must not contain each "
                         "other (replacing one would delete or nest in the other)")
    if dtype is None:
        dtype = source_dtype(src, lora=lora)
    with tqdm(desc="read", unit="tensor", disable=not progress, file=sys.stderr) as bar:

        def on_tensor(name: str, total: int) -> None:
            bar.total = total + 1  # every tensor, then the write
            bar.update()

        # A VLM's vision weights too are stored in `dtype` (the released ones are bf16, so
        # bf16 loses nothing); load_model casts them to its vision_dtype.
        model = nld_jax.load_model(src, dtype=dtype, lora=None if lora else False,
                                   on_tensor=on_tensor, vision_dtype=dtype)
        bar.set_description("write")
        with atomic.atomic_directory(dst, overwrite=overwrite) as tmp:
            _write(model, src, tmp, dtype)
        bar.update()
        bar.set_description("done")


@exit_on_interrupt("nld-convert")
def main(argv: Sequence[str] | None = None) -> int:
    """The nld-convert command; returns the exit status (2 on bad input, with a one-line error;
    130 on Ctrl-C, the destination as it was)."""
    parser = OneLineParser(prog="nld-convert",
                           description="Convert a released NLD checkpoint to Orbax.")
    parser.add_argument("src", help="Hugging Face checkpoint directory (or Hub repo id)")
    parser.add_argument("dst", help="Orbax directory to create")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="the checkpoint's dtype (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-lora", action="store_true", help="leave out linear_spec_lora/")
    try:
        args = parser.parse_args(argv)
        convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                lora=not args.no_lora)
    except (UsageError, OSError, ValueError) as e:  # LoadError included
        message = " ".join(str(e).split())
        print(f"nld-convert: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
