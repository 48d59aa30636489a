"""Just enough ELF reading: DT_NEEDED of shared objects and the .modinfo of kernel modules."""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["needed_libs", "modinfo"]


def _sections(data: bytes) -> list[tuple[str, int, int, int, int]]:
    """(name, type, offset, size, link) for each section of a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize)
        raw.append((name, typ, off, size, link))
    strtab_off, strtab_size = raw[shstrndx][2], raw[shstrndx][3]
    strtab = data[strtab_off:strtab_off + strtab_size]
    out = []
    for name, typ, off, size, link in raw:
        end = strtab.find(b"\0", name)
        out.append((strtab[name:end].decode(), typ, off, size, link))
    return out


def needed_libs(path: str | Path) -> list[str]:
    data = Path(path).read_bytes()
    secs = _sections(data)
    out = []
    for _name, typ, off, size, link in secs:
        if typ != 6:  # SHT_DYNAMIC
            continue
        str_off, str_size = secs[link][2], secs[link][3]
        dynstr = data[str_off:str_off + str_size]
        for i in range(0, size, 16):
            tag, val = struct.unpack_from("<qQ", data, off + i)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                out.append(dynstr[val:dynstr.find(b"\0", val)].decode())
    return out


def modinfo(path: str | Path) -> dict[str, str]:
    data = Path(path).read_bytes()
    for name, _typ, off, size, _link in _sections(data):
        if name == ".modinfo":
            info: dict[str, str] = {}
            for entry in data[off:off + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep and key not in info:
                    info[key] = value
            return info
    return {}
