"""Kernel helpers: turn a compressed bzImage into the uncompressed ELF that boots via PVH.

Under TCG about half of a small guest's boot is spent decompressing the bzImage; QEMU can
load the uncompressed ELF ``vmlinux`` directly through its PVH entry point.
"""

from __future__ import annotations

import lzma
from pathlib import Path

from ..errors import BuildError
from ..fsutil import atomic_path

__all__ = ["extract_vmlinux", "is_elf"]

_XZ_MAGIC = b"\xfd7zXZ\x00"


def is_elf(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def extract_vmlinux(bzimage: str | Path, out: str | Path) -> Path:
    """Decompress the XZ payload of a bzImage into an ELF vmlinux (atomic write)."""
    data = Path(bzimage).read_bytes()
    start = data.find(_XZ_MAGIC)
    while start != -1:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            with atomic_path(out) as tmp:
                tmp.write_bytes(elf)
            return Path(out)
        start = data.find(_XZ_MAGIC, start + 1)
    raise BuildError(f"{bzimage}: no XZ-compressed ELF payload found",
                     hint="only XZ-compressed kernels (Debian's) can be unpacked for PVH boot")
