"""The prompts and runs the mesh workers and tests/test_sharding.py share (no JAX set-up here:
the workers configure their devices before importing anything)."""

PROMPTS = [[1, 5, 9, 12], [1, 7], [1, 3, 3, 3, 3, 3, 3, 3, 8], [1, 2, 4], [1, 60, 61, 62, 63, 64],
           [1, 9], [1, 10, 20, 30, 40, 50, 60], [1, 100 - 1]]
RUNS = {"ar/greedy": dict(mode="ar"),
        "self_spec/sampled": dict(mode="self_spec", temperature=0.8, seed=3),
        "diffusion/greedy": dict(mode="diffusion")}
