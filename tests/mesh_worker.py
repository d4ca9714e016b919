"""The 8-CPU-device process of tests/test_sharding.py (the device count is fixed when JAX starts,
so the main test processes keep their single device).

Usage: python -m tests.mesh_worker CHECKPOINT_DIR LAYOUTS RULES_JSON, LAYOUTS like "8x1,2x4,1x8"
(data x model). Prints one JSON object: for the single-device run and each layout, the tokens of
every mode, greedy and sampled (fixed seed), on a ragged batch; and per layout the shape of every
parameter's shard on each device.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from flax import nnx  # noqa: E402

import nld_jax  # noqa: E402
from nld_jax.sharding import make_mesh  # noqa: E402
from tests.mesh_cases import PROMPTS  # noqa: E402

SAMPLINGS = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, seed=3)}


def _tokens(model: nld_jax.NLDModel) -> dict[str, list[list[int]]]:
    return {f"{mode}/{name}": nld_jax.generate(model, PROMPTS, mode=mode, max_new_tokens=16,
                                               block_size=8, eos_token_ids=[127],
                                               **sampling).tokens
            for mode in nld_jax.MODES for name, sampling in SAMPLINGS.items()}


def main() -> None:
    path, layouts, rules = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    single = nld_jax.load_model(path, dtype="float32")
    single_params = nnx.to_pure_dict(nnx.state(single))
    report: dict[str, object] = {"devices": jax.device_count(), "single": _tokens(single),
                                 "layouts": {}}
    for layout in layouts:
        data, model_axis = (int(n) for n in layout.split("x"))
        model = nld_jax.load_model(path, dtype="float32",
                                   mesh=make_mesh(data=data, model=model_axis), rules=rules)
        params = nnx.to_pure_dict(nnx.state(model))
        shards = {".".join(str(k.key) for k in p): {
            "shape": list(leaf.shape), "devices": len(leaf.addressable_shards),
            "shards": sorted({tuple(s.data.shape) for s in leaf.addressable_shards})}
            for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
        # Read slice by slice from the files: the same values as the whole-tensor read.
        equal = jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                          params, single_params))
        report["layouts"][layout] = {"tokens": _tokens(model), "shards": shards,
                                     "params_equal": equal}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
