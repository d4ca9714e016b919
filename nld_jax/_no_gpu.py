"""Keeps a machine without an NVIDIA GPU quiet when JAX's CUDA plugin is installed.

The `aot` extra installs jax's CUDA 13 plugin so that programs can be compiled for an H100 on a
CPU-only machine (nld_jax.aot). Without a GPU the plugin's start-up version checks fail and
print a traceback on the first use of JAX, although JAX then runs on the CPU as before. Where no
NVIDIA device node exists we skip those checks, so a CPU-only user sees exactly what they saw
without the extra; where a GPU is present nothing is changed. Imported first by nld_jax.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def nvidia_device_visible() -> bool:
    """Whether this machine exposes an NVIDIA GPU (its device nodes exist)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA 13 plugin (the `aot` extra) is installed."""
    # find_spec of a dotted name raises when the parent package is absent, as it is without
    # any jax plugin installed.
    return (importlib.util.find_spec("jax_plugins") is not None
            and importlib.util.find_spec("jax_plugins.xla_cuda13") is not None)


if not nvidia_device_visible():
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
