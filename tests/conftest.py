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

# The aot layer runs in a process of its own (tests/test_aot_layer.py starts it with this
# variable set). Compiling Mosaic-GPU kernels through the CUDA plugin leaves exception-unwind
# tables behind in the process; a C++ exception thrown by a later CPU compile then crashes in
# libgcc's unwinder (_Unwind_Find_FDE, seen in a core dump of a full run).
AOT_IN_PROCESS = "NLD_AOT_IN_PROCESS"
collect_ignore = [] if os.environ.get(AOT_IN_PROCESS) == "1" else ["aot"]


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
