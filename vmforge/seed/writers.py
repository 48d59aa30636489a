"""Seed writers: ISO 9660 (Joliet + Rock Ridge) in-process with pycdlib, and vfat."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from .. import run
from ..errors import SeedError
from .build import Seed

__all__ = ["write_iso", "write_vfat", "write_seed"]

LABEL = "cidata"


def _iso_name(name: str) -> str:
    return "/" + name.upper().replace("-", "_") + ".;1"


def write_iso(seed: Seed, path: str | Path) -> Path:
    """Write the seed as an ISO (what `cloud-localds` makes), atomically."""
    import pycdlib

    path = Path(path)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL,
            sys_ident="LINUX")
    for name, data in seed.files():
        iso.add_fp(io.BytesIO(data), len(data), _iso_name(name), rr_name=name,
                   joliet_path="/" + name)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fp:
            iso.write_fp(fp)
        os.replace(tmp, path)
    finally:
        iso.close()
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
