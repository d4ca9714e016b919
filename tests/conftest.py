"""Shared test fixtures: the golden checkpoints and small random models."""

from __future__ import annotations

import gc
import os
import pathlib
from typing import Any

import numpy as np
import pytest

GOLDEN_DIR = pathlib.Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = ("gqa4_theta1e6", "gqa3_theta1e9_sharded")
LONG_DIR = pathlib.Path(__file__).parent / "fixtures" / "long_context"

# The aot layer runs in a process of its own (tests/test_aot_layer.py starts it with this
# variable set): its GPU compiles need the CUDA plugin and their own memory.
AOT_IN_PROCESS = "NLD_AOT_IN_PROCESS"
collect_ignore = [] if os.environ.get(AOT_IN_PROCESS) == "1" else ["aot"]

# XLA CPU pool threads the Mosaic-GPU interpreter needs for a two-warpgroup kernel: one per
# simulated warpgroup, one for the enclosing program, one to spare (see pytest_configure).
INTERPRETER_POOL_THREADS = 4


def _memory_map_count() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def _memory_map_limit() -> int:
    with open("/proc/sys/vm/max_map_count") as limit:
        return int(limit.read())


def _release_compiled_programs() -> None:
    import jax  # not at import time: conftest loads before pytest_configure sets the env

    jax.clear_caches()
    gc.collect()


# Each program XLA's CPU backend compiles lives in JIT memory of its own (several memory maps
# per kernel), and jax keeps every program alive in its caches. A full run compiles thousands
# of them: the process reached Linux's vm.max_map_count (65530), the JIT failed to map a new
# kernel ("Failed to materialize symbols") and the C++ exception that reported it crashed
# libgcc's unwinder (a segfault; its core dump held 65424 maps). So compiled programs are
# released after every module, and after any test that leaves the process past half the limit.
@pytest.fixture(autouse=True, scope="module")
def _release_programs_per_module() -> Any:
    yield
    _release_compiled_programs()


@pytest.fixture(autouse=True)
def _release_programs_near_map_limit() -> Any:
    yield
    if _memory_map_count() > _memory_map_limit() // 2:
        _release_compiled_programs()


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
    # Not in the aot layer, which compiles for the GPU as a user's program would be.
    if os.environ.get(AOT_IN_PROCESS) != "1":
        os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    # The Mosaic-GPU interpreter runs each simulated warpgroup of a thread block as a program
    # of its own whose barrier waits block a thread, and XLA's CPU runtime may run any of
    # those waits, and the enclosing program's callback that waits for all of them, on its
    # intra-op thread pool, sized by PJRT_NPROC or else the core count. With two warpgroups
    # that is up to three blocked pool threads: on a 2-core machine the pool ran out and
    # the kernel hung at random (deterministically with PJRT_NPROC=1, never seen with 4).
    os.environ.setdefault("PJRT_NPROC", str(max(INTERPRETER_POOL_THREADS, os.cpu_count() or 1)))
    # No persistent compilation cache in tests (the commands default to one in ~/.cache): every
    # program is compiled by the code under test, and nothing is written outside tmp dirs.
    # tests/test_cli.py checks the cache in subprocesses of its own.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = ""
