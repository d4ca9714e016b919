"""The 8-CPU-device process of tests/test_sampling.py: top-p on logits split over the vocabulary.

Usage: python -m tests.sampling_mesh_worker. Prints one JSON object: per case, whether the
filtered logits and the sampled tokens of the vocab-sharded program (a 1 x 8 ("data", "model")
mesh, the logits' last axis on "model") equal the single-device ones, and the collectives of
the sharded [2, 4, 16384] program by kind (count, bytes).
"""

from __future__ import annotations

import json
import os

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from nld_jax import aot  # noqa: E402
from nld_jax.sampling import filter_logits, sample_tokens  # noqa: E402
from nld_jax.sharding import make_mesh  # noqa: E402
from tests.test_sampling import mass_above, off_the_edge  # noqa: E402

SHAPE = (2, 4, 16384)


def _step(logits: jax.Array, key: jax.Array, temperature: jax.Array,
          top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (filter_logits(logits, temperature, top_k=0, top_p=top_p),
            sample_tokens(logits, key, temperature, top_p=top_p))


def main() -> None:
    mesh = make_mesh(data=1, model=8)
    vocab_split = NamedSharding(mesh, PartitionSpec(None, None, "model"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = jax.jit(_step, in_shardings=(vocab_split, replicated, replicated, replicated))
    single = jax.jit(_step)
    rng = np.random.default_rng(11)
    cases = []
    for index, (scale, temperature) in enumerate([(1.0, 1.0), (4.0, 0.7), (8.0, 1.0),
                                                  (2.0, 1.5), (4.0, 1.0), (0.5, 0.3)]):
        logits = (rng.normal(size=SHAPE) * scale).astype(np.float32)
        if index % 2:  # bf16-rounded: ties
            logits = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
        scaled = np.asarray(filter_logits(jnp.asarray(logits), temperature))
        top_p = off_the_edge(rng, mass_above(scaled), 0.2, 0.95)
        args = (jnp.float32(temperature), jnp.float32(top_p))
        key = jax.random.key(index)
        want_filtered, want_tokens = single(logits, key, *args)
        got_filtered, got_tokens = sharded(jax.device_put(logits, vocab_split), key, *args)
        assert len(got_filtered.sharding.device_set) == 8
        cases.append(dict(
            top_p=top_p, kept=np.isfinite(np.asarray(want_filtered)).sum(-1).ravel().tolist(),
            filtered_equal=bool(np.array_equal(np.asarray(got_filtered),
                                               np.asarray(want_filtered))),
            tokens_equal=bool(np.array_equal(np.asarray(got_tokens), np.asarray(want_tokens)))))
    compiled = sharded.lower(jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=vocab_split),
                             jax.random.key(0), jnp.float32(1), jnp.float32(0.9)).compile()
    collectives = aot.Program(compiled, 0.0, ()).collectives
    print(json.dumps({"devices": jax.device_count(), "cases": cases,
                      "logits_bytes": int(np.prod(SHAPE)) * 4,
                      "collectives": {kind: [c.count, c.bytes] for kind, c in
                                      collectives.items()}}))


if __name__ == "__main__":
    main()
