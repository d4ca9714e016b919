"""The aot layer (tests/aot), in a pytest process of its own: its GPU compiles keep their memory
and JIT maps out of the main run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from nld_jax._no_gpu import cuda_plugin_installed

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.aot
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not cuda_plugin_installed(),
                    reason="the aot layer needs the `aot` extra (jax[cuda13])")
def test_aot_layer_in_its_own_process():
    # The programs are compiled as a user's would be: without the float32 matmul precision this
    # process's pytest_configure sets for the goldens (under it, XLA keeps float32 copies of
    # bf16 operands and an 8B program's temp memory exceeded the layer's bound by 47%).
    env = {key: value for key, value in os.environ.items()
           if key != "JAX_DEFAULT_MATMUL_PRECISION"}
    env["NLD_AOT_IN_PROCESS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/aot"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=2300)
    print(result.stdout[-20000:], result.stderr[-5000:])
    # 0: passed (skips included, e.g. without the aot extra); anything else is a failure.
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
