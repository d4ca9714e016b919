"""The README's main command runs and shows every mode producing the right text."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generate_example_runs_all_modes():
    result = subprocess.run([sys.executable, "examples/generate.py"], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for mode in ("ar", "diffusion", "self_spec"):
        text = next(line for line in lines if line.startswith(mode + " "))
        assert "'1 2 3 4 7 8 9'" in text, result.stdout
    assert result.stdout.count("tokens/forward") == 3
