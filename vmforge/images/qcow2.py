"""Disk images through qemu-img: overlays, blank disks, info, convert.

A backing image is only ever opened read-only: overlays name it with an explicit backing
format, so QEMU never probes (or writes) it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import run
from ..errors import ImageError

__all__ = ["ImageInfo", "image_info", "create_overlay", "create_blank", "convert", "GIB"]

GIB = 1024 ** 3


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None
    chain: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "virtual_size": self.virtual_size,
                "actual_size": self.actual_size, "backing_file": self.backing_file,
                "backing_format": self.backing_format, "chain": list(self.chain)}


def _qemu_img() -> str:
    return run.require_binary("qemu-img", "qemu-utils")


def image_info(path: str | Path) -> ImageInfo:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    res = run.run([_qemu_img(), "info", "--backing-chain", "--output=json", "-U", str(path)],
                  what="qemu-img info")
    data = json.loads(res.stdout)
    chain = data if isinstance(data, list) else [data]
    top = chain[0]
    return ImageInfo(
        path=str(path), format=top["format"], virtual_size=int(top["virtual-size"]),
        actual_size=int(top.get("actual-size", 0)),
        backing_file=top.get("full-backing-filename") or top.get("backing-filename"),
        backing_format=top.get("backing-filename-format"),
        chain=tuple(c["filename"] for c in chain),
    )


def create_overlay(backing: str | Path, path: str | Path, size_bytes: int | None = None,
                   backing_format: str | None = None) -> Path:
    """A thin qcow2 overlay on ``backing``; grown to ``size_bytes`` if that is larger."""
    backing = Path(backing).resolve()
    path = Path(path)
    if not backing.is_file():
        raise ImageError(f"backing image not found: {backing}")
    info = image_info(backing)
    fmt = backing_format or info.format
    size = max(size_bytes or 0, info.virtual_size)
    run.run([_qemu_img(), "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing),
             "-o", "cluster_size=65536", str(path), str(size)], what="qemu-img create")
    return path


def create_blank(path: str | Path, size_bytes: int, fmt: str = "qcow2") -> Path:
    run.run([_qemu_img(), "create", "-q", "-f", fmt, str(path), str(size_bytes)],
            what="qemu-img create")
    return Path(path)


def convert(src: str | Path, dst: str | Path, *, fmt: str = "qcow2", compress: bool = False,
            src_format: str | None = None) -> Path:
    """Flatten ``src`` (and its backing chain) into a standalone image, atomically."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    argv = [_qemu_img(), "convert", "-O", fmt]
    if src_format:
        argv += ["-f", src_format]
    if compress:
        argv.append("-c")
    try:
        run.run(argv + [str(src), str(tmp)], what="qemu-img convert")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
