"""Seed writers: ISO 9660 (Joliet + Rock Ridge) in-process, and vfat (mkfs.vfat + mcopy)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import run
from ..errors import SeedError
from .build import Seed
from .iso9660 import build_iso

__all__ = ["write_iso", "write_vfat", "write_seed"]

LABEL = "cidata"


def write_iso(seed: Seed, path: str | Path, mtime: float | None = None) -> Path:
    """Write the seed as an ISO 9660 image labelled cidata (what `cloud-localds` makes),
    with Joliet and Rock Ridge names, atomically."""
    path = Path(path)
    data = build_iso(seed.files(), LABEL, mtime)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_vfat(seed: Seed, path: str | Path) -> Path:
    """Write the seed as a FAT image labelled CIDATA (as `cloud-localds -f vfat`)."""
    path = Path(path)
    mkfs = run.require_binary("mkfs.vfat", "dosfstools")
    mcopy = run.require_binary("mcopy", "mtools")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        size_kib = max(1024, (sum(len(d) for _, d in seed.files()) // 1024) * 2 + 512)
        run.run([mkfs, "-n", LABEL.upper(), "-C", str(tmp), str(size_kib)], what="mkfs.vfat")
        with tempfile.TemporaryDirectory() as td:
            for name, data in seed.files():
                (Path(td) / name).write_bytes(data)
                run.run([mcopy, "-oi", str(tmp), str(Path(td) / name), f"::{name}"],
                        what="mcopy", env={"MTOOLS_SKIP_CHECK": "1"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_seed(seed: Seed, path: str | Path, fmt: str = "iso") -> Path:
    if fmt == "iso":
        return write_iso(seed, path)
    if fmt == "vfat":
        return write_vfat(seed, path)
    raise SeedError(f"unknown seed format {fmt!r}", field="format", hint="use iso or vfat")
