"""The README's shell commands work as written after the README's own install.

The install is `python3.12 -m venv .venv && .venv/bin/pip install -e ".[test,aot]"`, and nothing
activates the environment, so every command must name `.venv/bin/...`. Each command that needs
no download (no `path/to/` checkpoint, no 8B model, no pip) is run in a scratch directory that
holds the repository's files and a `.venv/bin/` with this interpreter and the console scripts
of pyproject.toml (the installed ones when this environment has them, as CI's does).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Commands that need what a test cannot have: a released checkpoint, the network, a GPU.
NEEDS_DOWNLOAD = ("path/to/", "nld-8b-orbax", "pip install", "python3.12 -m venv",
                  "-m pytest")


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_command_names_the_environment():
    commands = _commands()
    assert len(commands) >= 8
    for command in commands:
        for part in re.split(r"&&|\|", command):
            program = part.split()[0]
            assert program.startswith(".venv/bin/") or part.strip().startswith(
                "python3.12 -m venv"), f"{command!r}: {program!r} needs an activated venv"


def _fake_venv(bin_dir: pathlib.Path) -> None:
    """.venv/bin/ with python and pyproject's console scripts (the installed ones if any)."""
    bin_dir.mkdir(parents=True)
    # A wrapper, not a symlink: a symlinked interpreter would look for pyvenv.cfg beside it.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    installed = pathlib.Path(sys.executable).parent
    for name, target in scripts.items():
        if (installed / name).is_file():
            (bin_dir / name).symlink_to(installed / name)
            continue
        module, function = target.split(":")
        (bin_dir / name).write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
            f"sys.exit({function}())\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    for name in ("nld_jax", "examples", "convert", "pallas_kernels", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    _fake_venv(tmp_path / ".venv" / "bin")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runnable = [c for c in _commands() if not any(word in c for word in NEEDS_DOWNLOAD)]
    assert len(runnable) >= 4, runnable
    for command in runnable:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, command
    assert (tmp_path / "tiny-orbax" / "nld_orbax.json").is_file()
    shutil.rmtree(tmp_path / "tiny-orbax")
