"""One of the two processes of tests/test_sharding.py's multi-host test: jax.distributed over
CPU (gloo collectives), 4 devices each, one 2 x 4 mesh across both.

Usage: python -m tests.multihost_worker PROCESS_ID PORT CHECKPOINT_DIR. Prints the tokens of
each run (tests.mesh_cases) as one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2,
                           process_id=int(sys.argv[1]))

import nld_jax  # noqa: E402
from nld_jax.sharding import make_mesh  # noqa: E402
from tests.mesh_cases import PROMPTS, RUNS  # noqa: E402

if __name__ == "__main__":
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    model = nld_jax.load_model(sys.argv[3], dtype="float32", mesh=make_mesh(data=2, model=4))
    print(json.dumps({name: nld_jax.generate(model, PROMPTS, max_new_tokens=16, block_size=8,
                                             eos_token_ids=[127], **run).tokens
                      for name, run in RUNS.items()}))
