"""Seed writers, both in-process: ISO 9660 (Joliet + Rock Ridge) and FAT12 (VFAT names)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SeedError
from ..fsutil import atomic_path
from .build import Seed
from .iso9660 import build_iso
from .vfat import vfat_regions

__all__ = ["write_iso", "write_vfat", "write_seed"]

LABEL = "cidata"


def write_iso(seed: Seed, path: str | Path, mtime: float | None = None) -> Path:
    """Write the seed as an ISO 9660 image labelled cidata (what `cloud-localds` makes),
    with Joliet and Rock Ridge names, atomically."""
    path = Path(path)
    data = build_iso(seed.files(), LABEL, mtime)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_vfat(seed: Seed, path: str | Path, mtime: float | None = None) -> Path:
    """Write the seed as a FAT image labelled CIDATA (as `cloud-localds -f vfat`)."""
    path = Path(path)
    size, regions = vfat_regions(seed.files(), LABEL.upper(), mtime)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off, data in regions:  # the rest stays a hole: the image is mostly zeros
                os.pwrite(fd, data, off)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return path


def write_seed(seed: Seed, path: str | Path, fmt: str = "iso") -> Path:
    if fmt == "iso":
        return write_iso(seed, path)
    if fmt == "vfat":
        return write_vfat(seed, path)
    raise SeedError(f"unknown seed format {fmt!r}", field="format", hint="use iso or vfat")
