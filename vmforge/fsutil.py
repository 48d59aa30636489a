"""Small file helpers shared by the writers and builders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_file", "tail_text", "fsync_dir"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one rename,
    on failure it is removed, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a text file (creating its directory) with an explicit mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def tail_text(path: str | Path, lines: int = 25, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a (console) log, reading at most ``max_bytes`` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink in ``path`` durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
