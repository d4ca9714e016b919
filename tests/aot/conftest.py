"""The aot layer: programs compiled for an H100 on this (CPU-only) machine.

It needs jax's CUDA plugin (the `aot` extra: `pip install -e ".[test,aot]"`); without it the
layer is skipped as a whole, with that reason.
"""

from __future__ import annotations

import pytest

import nld_jax  # noqa: F401  (first: keeps the plugin's start-up checks quiet without a GPU)
from nld_jax._no_gpu import cuda_plugin_installed

if not cuda_plugin_installed():
    pytest.skip("the aot layer needs the `aot` extra (jax[cuda13])", allow_module_level=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/aot/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.aot)
