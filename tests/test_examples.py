"""The README's main command runs and shows every mode producing the right text."""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import nld_jax
from nld_jax import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generate_example_runs_all_modes():
    result = subprocess.run([sys.executable, "examples/generate.py"], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for mode in ("ar", "diffusion", "self_spec", "self_spec_quadratic"):
        text = next(line for line in lines if line.startswith(mode + " "))
        assert "'1 2 3 4 7 8 9'" in text, result.stdout
    assert result.stdout.count("tokens/forward") == 4


def test_benchmark_runs_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, "examples/benchmark.py", "--prompt", "16", "--new",
                             "8", "--repeats", "1", "--out", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert [m["mode"] for m in report["modes"]] == list(nld_jax.MODES)
    assert report["forward_ms_T1"] > 0 and 0 < report["roofline_fraction_T32"]
    assert "| self_spec |" in (tmp_path / "benchmark.md").read_text()


def test_chat_example_reads_turns_from_a_pipe():
    # The bundled model's chat template turns the last user turn into its task format.
    result = subprocess.run(
        [sys.executable, "examples/chat.py", "--model", str(tiny.TINY_MODEL_DIR), "--dtype",
         "float32", "--max-new-tokens", "16"],
        input="sort 3 9 1 4\n\nreverse 1 2 3 4\n/exit\nsort 2 1\n",
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 3 4 9\n4 3 2 1\n"
    assert result.stderr.count("tokens/forward") == 2


def _digest(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_tiny_never_overwrites_the_bundled_model(tmp_path):
    bundled = _digest(tiny.TINY_MODEL_DIR)
    existing = tmp_path / "mine"
    existing.mkdir()
    for args, message in [
        ([], "the following arguments are required: --out"),
        (["--out", str(tiny.TINY_MODEL_DIR)], "inside the package's bundled assets"),
        (["--out", str(tiny.TINY_MODEL_DIR / "sub"), "--overwrite"], "bundled assets"),
        (["--out", str(existing)], "already exists (pass --overwrite"),
        (["--out", str(tmp_path / "new"), "--steps", "0"], "--steps and --batch must be"),
    ]:
        result = subprocess.run([sys.executable, "examples/train_tiny.py", *args],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _digest(tiny.TINY_MODEL_DIR) == bundled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
