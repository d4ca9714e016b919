"""Installing the aot extra changes nothing a CPU-only user sees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nld_jax._no_gpu import nvidia_device_visible


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=True)


@pytest.mark.skipif(nvidia_device_visible(), reason="checks a machine without an NVIDIA GPU")
def test_cpu_only_machine_stays_on_cpu_quietly():
    # jax alone: the plugin's start-up check fails loudly (what nld_jax must hide) ...
    bare = _run("import jax; print(jax.default_backend())")
    assert bare.stdout.strip() == "cpu"
    assert "Traceback" in bare.stderr
    # ... and with nld_jax imported first the same process is silent, still on the CPU.
    quiet = _run("import nld_jax, jax; print(jax.default_backend())")
    assert quiet.stdout.strip() == "cpu"
    # (No traceback; a fresh venv's first run may print unrelated one-off notices.)
    assert "Traceback" not in quiet.stderr and "RuntimeError" not in quiet.stderr, quiet.stderr
