"""The aot layer: programs compiled for an H100 on this (CPU-only) machine.

It needs jax's CUDA plugin (the `aot` extra: `pip install -e ".[test,aot]"`); without it the
layer is skipped as a whole, with that reason.
"""

from __future__ import annotations

import importlib.util

import pytest

import nld_jax  # noqa: F401  (first: keeps the plugin's start-up checks quiet without a GPU)

if importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
    pytest.skip("the aot layer needs the `aot` extra (jax[cuda13])", allow_module_level=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/aot/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.aot)
