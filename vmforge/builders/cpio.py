"""A newc cpio writer for initramfs images: deterministic, root-owned, no external tools."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..fsutil import atomic_path

__all__ = ["write_cpio"]


def _header(ino: int, mode: int, size: int, nlink: int, mtime: int, name: bytes) -> bytes:
    fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, 0, 0, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _entry(out: BinaryIO, ino: int, mode: int, name: str, body: bytes, mtime: int) -> None:
    bname = name.encode()
    nlink = 2 if stat.S_ISDIR(mode) else 1
    head = _header(ino, mode, len(body), nlink, mtime, bname) + bname + b"\0"
    out.write(head + _pad(len(head)))
    out.write(body + _pad(len(body)))


def write_cpio(root: Path, out_path: Path, mtime: int = 0) -> None:
    """Archive the tree under ``root`` (all entries owned by root:root)."""
    ino = 1
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                p = Path(dirpath) / name
                rel = str(p.relative_to(root))
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    body = os.readlink(p).encode()
                elif stat.S_ISREG(st.st_mode):
                    body = p.read_bytes()
                else:
                    body = b""
                _entry(out, ino, st.st_mode, rel, body, mtime)
                ino += 1
        _entry(out, 0, 0, "TRAILER!!!", b"", 0)
