"""Replacing a directory all at once: what save_model and nld-convert write goes through here.

The new content is written into a hidden sibling `.NAME.tmp-PID-RANDOM` (same file system, so
renames are atomic), fsynced, and only then swapped in: an existing NAME is renamed aside to
`.NAME.old-PID-RANDOM`, the new directory renamed to NAME, the old one removed. Until the swap
the old NAME is untouched; a failure (or Ctrl-C) before it removes the temporary directory, and
one between the two renames puts the old directory back.

A process killed outright (kill -9, power loss) cannot clean up, so every writer first calls
`clean_stale(NAME)`: siblings left by processes that no longer run are removed, and an old
directory whose swap never finished is renamed back to NAME if nothing took its place.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator

__all__ = ["atomic_directory", "check_destination", "clean_stale", "sibling", "file_mode"]

_TAGS = ("tmp", "old")


def sibling(dst: str, tag: str) -> str:
    """A fresh hidden name beside dst, owned by this process: `.NAME.TAG-PID-RANDOM`."""
    return os.path.join(os.path.dirname(dst),
                        f".{os.path.basename(dst)}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def file_mode() -> int:
    """The mode open() gives a new file under the process's umask (0o644 under umask 022).

    For writers that create files their own way (safetensors writes 0600 through a temporary
    file), so a saved model is as readable as anything else the user writes.
    """
    try:  # Linux: read without changing it (os.umask() would race with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def clean_stale(dst: str) -> list[str]:
    """Removes the siblings of dst that writers which no longer run left behind.

    An `old` sibling is the previous dst of an interrupted swap: when dst is missing it is
    renamed back to dst (the data it holds was never replaced), otherwise removed.

    Returns:
      The names of the siblings removed or restored.
    """
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    pattern = re.compile(rf"\.{re.escape(name)}\.({'|'.join(_TAGS)})-(\d+)-[0-9a-f]+")
    try:
        entries = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    cleaned = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "old" and not os.path.lexists(dst):
            os.replace(path, dst)
        else:
            shutil.rmtree(path, ignore_errors=True)
        cleaned.append(entry)
    return cleaned


def _fsync_tree(root: str) -> None:
    """Every file and directory under root on disk (directories last, so their entries are)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(dst: str, overwrite: bool) -> None:
    """dst may be created (or replaced, with overwrite): else FileExistsError/FileNotFoundError."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite, or overwrite=True, to "
                              "replace it)")
    if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
        raise FileExistsError(f"{dst}: exists and is not a directory; not replacing it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: the destination's parent directory does not exist")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool) -> Iterator[str]:
    """Yields an empty temporary directory that becomes dst when the block ends without error.

    Args:
      dst: the directory to create or replace.
      overwrite: allow replacing an existing dst (FileExistsError otherwise, before anything
        is written, and again at the swap if dst appeared meanwhile).
    """
    dst = os.path.abspath(os.fspath(dst))
    clean_stale(dst)
    check_destination(dst, overwrite)
    tmp = sibling(dst, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        check_destination(dst, overwrite)  # nobody created it meanwhile
        _swap(tmp, dst)
    except BaseException:  # Ctrl-C included: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(os.path.dirname(dst))


def _swap(tmp: str, dst: str) -> None:
    """Renames tmp to dst; an existing dst is moved aside first and removed after."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    # rename() cannot replace a non-empty directory: swap through a second sibling.
    old = sibling(dst, "old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old)
