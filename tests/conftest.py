"""Shared test fixtures: the golden checkpoints and small random models."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

GOLDEN_DIR = pathlib.Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = ("gqa4_theta1e6", "gqa3_theta1e9_sharded")


@pytest.fixture(params=GOLDEN_CASES)
def golden_case(request: pytest.FixtureRequest) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """(checkpoint directory, golden arrays) for each fixture checkpoint."""
    path = GOLDEN_DIR / request.param
    with np.load(path / "golden.npz") as data:
        return path, {k: data[k] for k in data.files}


def pytest_configure(config: pytest.Config) -> None:
    # Tests compare float32 results with transformers' float32: keep XLA's CPU matmuls in f32.
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
