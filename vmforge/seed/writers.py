"""Seed writers, both in-process: ISO 9660 (Joliet + Rock Ridge) and FAT12 (VFAT names).

:func:`write_seed_file` is the whole of `vmforge seed build`'s writing and imports neither
pathlib nor the rest of vmforge: that command's start-up is measured against `cloud-localds`.
"""

from __future__ import annotations

import os

from ..errors import SeedError
from .iso9660 import build_iso
from .vfat import vfat_regions

TYPE_CHECKING = False  # not typing's: the seed path must not import it
if TYPE_CHECKING:
    from pathlib import Path

    from .build import Seed

__all__ = ["write_iso", "write_vfat", "write_seed", "write_seed_file"]

LABEL = "cidata"


def _write_atomically(path: str, size: int, regions: list[tuple[int, bytes]]) -> None:
    """Write ``regions`` (offset, bytes) of a ``size``-byte file to a temporary sibling and
    rename it over ``path``: readers never see a half-written seed; on failure nothing is
    left. What no region covers stays a hole."""
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off, data in regions:
                os.pwrite(fd, data, off)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def write_seed_file(seed: Seed, path: str | os.PathLike[str], fmt: str = "iso",
                    mtime: float | None = None) -> None:
    """Write the seed as ``fmt``: ``iso`` (ISO 9660 labelled cidata, what `cloud-localds`
    makes) or ``vfat`` (FAT labelled CIDATA, as `cloud-localds -f vfat`)."""
    path = os.fspath(path)
    if fmt == "iso":
        data = build_iso(seed.files(), LABEL, mtime)
        _write_atomically(path, len(data), [(0, data)])
    elif fmt == "vfat":
        size, regions = vfat_regions(seed.files(), LABEL.upper(), mtime)
        _write_atomically(path, size, regions)
    else:
        raise SeedError(f"unknown seed format {fmt!r}", field="format",
                        hint="use iso or vfat")


def write_iso(seed: Seed, path: str | Path, mtime: float | None = None) -> Path:
    """Write the seed as an ISO 9660 image labelled cidata, atomically."""
    from pathlib import Path
    write_seed_file(seed, path, "iso", mtime)
    return Path(path)


def write_vfat(seed: Seed, path: str | Path, mtime: float | None = None) -> Path:
    """Write the seed as a FAT image labelled CIDATA, atomically."""
    from pathlib import Path
    write_seed_file(seed, path, "vfat", mtime)
    return Path(path)


def write_seed(seed: Seed, path: str | Path, fmt: str = "iso") -> Path:
    from pathlib import Path
    write_seed_file(seed, path, fmt)
    return Path(path)
