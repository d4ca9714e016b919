"""The process tests/test_fuzz_loading.py loads mutated checkpoints in (so a hang or a crash
of the interpreter is caught as such instead of taking the test session down).

Usage: python tests/fuzz_loading_worker.py ORIGINAL_DIR. Reads one checkpoint directory per
line on stdin and answers one JSON line per directory on stdout:

    {"outcome": "equal"}                      loaded, identical to ORIGINAL_DIR's model
    {"outcome": "variant", "differs": [...]}  loaded completely, some parts differ (what)
    {"outcome": "named", "error": "LoadError", "message": ...}    a named error
    {"outcome": "other", "error": "KeyError", "message": ...}     anything else: a defect

A loaded model counts only if every parameter is a concrete, finite array (of the original's
shapes when the config and adapter are the original's), and its tokenizer, if any, encodes a
prompt and renders a chat turn (each of those may also raise TokenizerError, a named error).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nld_jax  # noqa: E402
from nld_jax.config import ConfigError  # noqa: E402
from nld_jax.model import NLDModel  # noqa: E402  (type hints)
from nld_jax.tokenizer import TokenizerError  # noqa: E402

NAMED = (nld_jax.LoadError, ConfigError, TokenizerError)


def _summary(model: NLDModel) -> dict[str, object]:
    """What two loads must agree on: parameter digests, config, adapter, tokenizer."""
    state = nnx.state(model, nnx.Param)
    params = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if not isinstance(leaf, jax.Array):
            raise AssertionError(f"partial model: {jax.tree_util.keystr(path)} is {leaf!r}")
        array = np.asarray(leaf)
        if not np.isfinite(array.astype(np.float32)).all():
            raise AssertionError(f"non-finite parameter {jax.tree_util.keystr(path)}")
        params[jax.tree_util.keystr(path)] = (array.shape, hashlib.sha256(array.tobytes())
                                               .hexdigest())
    tokenizer = getattr(model, "tokenizer", None)
    return {"params": params, "config": model.config, "has_lora": model.has_lora,
            "tokenizer": None if tokenizer is None else tokenizer.fingerprint()}


def _use_tokenizer(model: NLDModel) -> None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.encode("<s> sort 3 1 2 4 =")
        if tokenizer.chat_template is not None:
            tokenizer.apply_chat_template([{"role": "user", "content": "sort 3 1 2 4"}])


def _case(path: str, original: dict[str, object]) -> dict[str, object]:
    try:
        model = nld_jax.load_model(path, dtype="float32")
        summary = _summary(model)
        _use_tokenizer(model)
    except NAMED as e:
        return {"outcome": "named", "error": type(e).__name__, "message": str(e)[:300]}
    except Exception as e:  # the defect the fuzz test looks for
        return {"outcome": "other", "error": type(e).__name__, "message": str(e)[:300],
                "traceback": traceback.format_exc()[-2000:]}
    differs = [key for key in ("config", "has_lora", "tokenizer")
               if summary[key] != original[key]]
    if "config" not in differs and "has_lora" not in differs:
        shapes = {name: shape for name, (shape, _) in summary["params"].items()}
        if shapes != {name: shape for name, (shape, _) in original["params"].items()}:
            return {"outcome": "other", "error": "PartialModel",
                    "message": "the same config gave other parameter shapes"}
    differs += sorted(name for name in set(summary["params"]) | set(original["params"])
                      if summary["params"].get(name) != original["params"].get(name))
    return {"outcome": "variant", "differs": differs[:10]} if differs else {"outcome": "equal"}


def main() -> None:
    original = _summary(nld_jax.load_model(sys.argv[1], dtype="float32"))
    print(json.dumps({"outcome": "ready"}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_case(line.strip(), original)), flush=True)


if __name__ == "__main__":
    main()
