"""Shared test fixtures: the golden checkpoints and small random models."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import pytest

GOLDEN_DIR = pathlib.Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = ("gqa4_theta1e6", "gqa3_theta1e9_sharded")
LONG_DIR = pathlib.Path(__file__).parent / "fixtures" / "long_context"


@pytest.fixture(params=GOLDEN_CASES)
def golden_case(request: pytest.FixtureRequest) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """(checkpoint directory, golden arrays) for each fixture checkpoint."""
    path = GOLDEN_DIR / request.param
    with np.load(path / "golden.npz") as data:
        return path, {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def long_golden() -> dict[str, np.ndarray]:
    """The long-context golden arrays (tests/fixtures/long_context)."""
    with np.load(LONG_DIR / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def long_model() -> Any:
    """The long-context fixture checkpoint, float32, no adapter."""
    import nld_jax  # not at import time: conftest loads before pytest_configure sets the env

    return nld_jax.load_model(LONG_DIR, dtype="float32", lora=False)


def pytest_configure(config: pytest.Config) -> None:
    # Tests compare float32 results with transformers' float32: keep XLA's CPU matmuls in f32.
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
