"""A small ISO 9660 writer for NoCloud seeds: one root directory, a handful of files.

Primary volume descriptor with Rock Ridge (RRIP 1.09: SP, CE -> ER, RR, PX, NM) and a Joliet
supplementary descriptor (UCS-2 level 3), both trees pointing at the same file extents. It
assembles the image in memory with ``struct`` (no object model), which is what makes a seed
cost tens of microseconds instead of milliseconds; the general-purpose pycdlib remains the
cross-check in the tests.

Layout (2048-byte sectors): 0-15 system area, 16 PVD, 17 Joliet SVD, 18 terminator,
19-22 path tables (L and M for each tree), 23 root (ISO+RR), 24 root (Joliet),
25 Rock Ridge continuation area (ER), 26.. file data.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

__all__ = ["build_iso"]

SECTOR = 2048
_PVD, _SVD, _TERM, _PT = 16, 17, 18, 19
_ROOT, _JROOT, _CONT, _DATA = 23, 24, 25, 26

_ER_ID = b"RRIP_1991A"
_ER_DES = (b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM "
           b"SEMANTICS")
_ER_SRC = (b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER "
           b"IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.")


def _b16(v: int) -> bytes:
    return struct.pack("<H", v) + struct.pack(">H", v)


def _b32(v: int) -> bytes:
    return struct.pack("<I", v) + struct.pack(">I", v)


def _dir_date(t: time.struct_time) -> bytes:
    return bytes([t.tm_year - 1900, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, 0])


def _vol_date(t: time.struct_time) -> bytes:
    return time.strftime("%Y%m%d%H%M%S00", t).encode() + b"\0"


def _record(ident: bytes, extent: int, size: int, is_dir: bool, date: bytes,
            system_use: bytes = b"") -> bytes:
    pad = b"\0" if len(ident) % 2 == 0 else b""
    length = 33 + len(ident) + len(pad) + len(system_use)
    if length > 255:
        raise ValueError("directory record too long")
    return (bytes([length, 0]) + _b32(extent) + _b32(size) + date +
            bytes([2 if is_dir else 0, 0, 0]) + _b16(1) + bytes([len(ident)]) + ident + pad +
            system_use)


def _px(mode: int, nlink: int) -> bytes:
    return b"PX" + bytes([36, 1]) + _b32(mode) + _b32(nlink) + _b32(0) + _b32(0)


def _rr(flags: int) -> bytes:
    return b"RR" + bytes([5, 1, flags])


def _nm(name: bytes) -> bytes:
    return b"NM" + bytes([5 + len(name), 1, 0]) + name


def _pad_text(text: str, n: int) -> bytes:
    return text.encode("ascii")[:n].ljust(n, b" ")


def _pad_ucs2(text: str, n: int) -> bytes:
    raw = text.encode("utf-16-be")[: n - n % 2]
    return raw + b"\0 " * ((n - len(raw)) // 2) + (b" " if n % 2 else b"")


def _short_name(name: str, used: set[bytes]) -> bytes:
    """An ISO level-1 (8.3) identifier; the real name is in Rock Ridge and Joliet."""
    stem = "".join(c if c.isalnum() else "_" for c in name.upper())[:8] or "FILE"
    cand = stem.encode()
    n = 1
    while cand in used:
        suffix = str(n)
        cand = (stem[: 8 - len(suffix)] + suffix).encode()
        n += 1
    used.add(cand)
    return cand + b".;1"


def _descriptor(kind: int, system: bytes, volume: bytes, escape: bytes, size: int,
                root: bytes, pt_l: int, pt_m: int, text: bytes, date: bytes) -> bytes:
    d = bytearray(SECTOR)
    d[0] = kind
    d[1:7] = b"CD001\x01"
    d[8:40] = system
    d[40:72] = volume
    d[80:88] = _b32(size)
    d[88:120] = escape.ljust(32, b"\0")
    d[120:124] = _b16(1)
    d[124:128] = _b16(1)
    d[128:132] = _b16(SECTOR)
    d[132:140] = _b32(10)
    d[140:144] = struct.pack("<I", pt_l)
    d[148:152] = struct.pack(">I", pt_m)
    d[156:190] = root
    d[190:702] = text * 4  # volume set, publisher, preparer, application identifiers
    d[702:813] = text[:37] * 3  # copyright, abstract, bibliographic file identifiers
    d[813:830] = date
    d[830:847] = date
    d[847:864] = b"0" * 16 + b"\0"
    d[864:881] = b"0" * 16 + b"\0"
    d[881] = 1
    return bytes(d)


def build_iso(files: Sequence[tuple[str, bytes]], volume_id: str = "cidata",
              mtime: float | None = None) -> bytes:
    """An ISO image holding ``files`` (name, content) in its root directory."""
    t = time.gmtime(time.time() if mtime is None else mtime)
    ddate, vdate = _dir_date(t), _vol_date(t)
    used: set[bytes] = set()
    entries = []
    sector = _DATA
    for name, data in files:
        entries.append((name, _short_name(name, used), sector if data else 0, data))
        sector += (len(data) + SECTOR - 1) // SECTOR
    total = sector

    er = (b"ER" + bytes([8 + len(_ER_ID) + len(_ER_DES) + len(_ER_SRC), 1, len(_ER_ID),
                         len(_ER_DES), len(_ER_SRC), 1]) + _ER_ID + _ER_DES + _ER_SRC)
    ce = b"CE" + bytes([28, 1]) + _b32(_CONT) + _b32(0) + _b32(len(er))
    sp = b"SP" + bytes([7, 1, 0xBE, 0xEF, 0])
    dir_mode = 0o040555

    root = bytearray()
    root += _record(b"\0", _ROOT, SECTOR, True, ddate, sp + _rr(0x01) + ce + _px(dir_mode, 2))
    root += _record(b"\1", _ROOT, SECTOR, True, ddate, _rr(0x01) + _px(dir_mode, 2))
    jroot = bytearray()
    jroot += _record(b"\0", _JROOT, SECTOR, True, ddate)
    jroot += _record(b"\1", _JROOT, SECTOR, True, ddate)
    for name, short, extent, data in sorted(entries, key=lambda e: e[1]):
        root += _record(short, extent, len(data), False, ddate,
                        _rr(0x01 | 0x08) + _px(0o100444, 1) + _nm(name.encode()))
    for name, _short, extent, data in sorted(entries, key=lambda e: e[0].encode("utf-16-be")):
        jroot += _record(name.encode("utf-16-be"), extent, len(data), False, ddate)
    if len(root) > SECTOR or len(jroot) > SECTOR:
        raise ValueError("too many files for a single-sector root directory")

    img = bytearray(total * SECTOR)
    text = _pad_text("", 128)
    root_rec = _record(b"\0", _ROOT, SECTOR, True, ddate)
    jroot_rec = _record(b"\0", _JROOT, SECTOR, True, ddate)
    img[_PVD * SECTOR:(_PVD + 1) * SECTOR] = _descriptor(
        1, _pad_text("LINUX", 32), _pad_text(volume_id, 32), b"", total, root_rec,
        _PT, _PT + 1, text, vdate)
    img[_SVD * SECTOR:(_SVD + 1) * SECTOR] = _descriptor(
        2, _pad_ucs2("LINUX", 32), _pad_ucs2(volume_id, 32), b"%/E", total, jroot_rec,
        _PT + 2, _PT + 3, _pad_ucs2("", 128), vdate)
    img[_TERM * SECTOR:_TERM * SECTOR + 7] = b"\xffCD001\x01"
    for i, (loc, big) in enumerate(((_ROOT, False), (_ROOT, True), (_JROOT, False),
                                    (_JROOT, True))):
        fmt = ">" if big else "<"
        off = (_PT + i) * SECTOR
        img[off:off + 10] = bytes([1, 0]) + struct.pack(fmt + "IH", loc, 1) + b"\0\0"
    img[_ROOT * SECTOR:_ROOT * SECTOR + len(root)] = root
    img[_JROOT * SECTOR:_JROOT * SECTOR + len(jroot)] = jroot
    img[_CONT * SECTOR:_CONT * SECTOR + len(er)] = er
    for _name, _short, extent, data in entries:
        img[extent * SECTOR:extent * SECTOR + len(data)] = data
    return bytes(img)
