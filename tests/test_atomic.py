"""nld_jax.atomic: a directory is replaced whole or not at all, and dead writers' leftovers go."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys

import pytest

from nld_jax import atomic


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def _siblings(dst: pathlib.Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def _write(directory: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = pathlib.Path(directory, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _tree(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_creates_then_replaces_without_leftovers(tmp_path):
    dst = tmp_path / "out"
    with atomic.atomic_directory(dst, overwrite=False) as tmp:
        assert not dst.exists() and pathlib.Path(tmp).parent == tmp_path
        _write(tmp, {"a.txt": "1", "sub/b.txt": "2"})
    assert _tree(dst) == {"a.txt": "1", "sub/b.txt": "2"}
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic.atomic_directory(dst, overwrite=False):
            raise AssertionError("not reached")
    with atomic.atomic_directory(dst, overwrite=True) as tmp:
        _write(tmp, {"c.txt": "3"})
        assert _tree(dst) == {"a.txt": "1", "sub/b.txt": "2"}  # untouched until the swap
    assert _tree(dst) == {"c.txt": "3"}  # nothing of the old directory survives
    assert _siblings(dst) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_the_old_directory(tmp_path, error):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(type(error)):
        with atomic.atomic_directory(dst, overwrite=True) as tmp:
            _write(tmp, {"half.txt": "x"})
            raise error
    assert _tree(dst) == {"keep.txt": "mine"} and _siblings(dst) == []


def test_failing_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    real_rename = os.rename

    def rename(src: str, target: str) -> None:
        if os.path.basename(src).startswith(".out.tmp-"):
            raise OSError("rename failed (simulated)")
        real_rename(src, target)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        with atomic.atomic_directory(dst, overwrite=True) as tmp:
            _write(tmp, {"new.txt": "x"})
    assert _tree(dst) == {"keep.txt": "mine"} and _siblings(dst) == []


def test_refuses_a_file_a_link_and_a_missing_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        atomic.check_destination(str(tmp_path / "file"), overwrite=True)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FileExistsError, match="not a directory"):
        atomic.check_destination(str(tmp_path / "link"), overwrite=True)
    with pytest.raises(FileNotFoundError, match="parent directory does not exist"):
        atomic.check_destination(str(tmp_path / "no" / "out"), overwrite=False)


def test_stale_leftovers_of_dead_writers_are_cleaned(tmp_path):
    dst = tmp_path / "out"
    dead, alive = _dead_pid(), os.getpid()
    for name in (f".out.tmp-{dead}-0a1b2c3d", f".out.tmp-{alive}-0a1b2c3d",
                 f".outer.tmp-{dead}-0a1b2c3d", f".out.tmp-{dead}-notahexname"):
        _write(str(tmp_path / name), {"w.bin": "partial"})
    # The old directory of a swap killed half-way, with no dst left: it comes back.
    _write(str(tmp_path / f".out.old-{dead}-00ff00ff"), {"keep.txt": "mine"})
    assert sorted(atomic.clean_stale(str(dst))) == sorted([f".out.old-{dead}-00ff00ff",
                                                            f".out.tmp-{dead}-0a1b2c3d"])
    assert _tree(dst) == {"keep.txt": "mine"}
    # A live writer's directory, another name's and a foreign name are not touched.
    assert _siblings(dst) == sorted([f".out.tmp-{alive}-0a1b2c3d",
                                     f".out.tmp-{dead}-notahexname"])
    assert (tmp_path / f".outer.tmp-{dead}-0a1b2c3d").is_dir()
    # With dst present, a dead writer's old directory is just removed.
    _write(str(tmp_path / f".out.old-{dead}-11111111"), {"stale.txt": "old"})
    assert atomic.clean_stale(str(dst)) == [f".out.old-{dead}-11111111"]
    assert _tree(dst) == {"keep.txt": "mine"}


def test_written_files_have_the_usual_modes(tmp_path):
    dst = tmp_path / "out"
    with atomic.atomic_directory(dst, overwrite=False) as tmp:
        _write(tmp, {"a.txt": "1", "sub/b.txt": "2"})
    umask = os.umask(0)
    os.umask(umask)
    for path in [dst, dst / "sub"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    for path in [dst / "a.txt", dst / "sub" / "b.txt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
