"""A small FAT12 writer for NoCloud seeds: one root directory with VFAT long names.

Boot sector, two FATs, a fixed root directory holding the volume label and the files (each
with its long-name entries and an 8.3 alias), then the data clusters. Cluster size grows with
the content so the cluster count stays in FAT12's range.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence

__all__ = ["build_vfat", "vfat_regions"]

SECTOR = 512
ROOT_ENTRIES = 64
MIN_SECTORS = 2048  # 1 MiB, as `cloud-localds -f vfat` makes


def _fat12(entries: list[int]) -> bytes:
    out = bytearray((len(entries) * 3 + 1) // 2)
    for i, v in enumerate(entries):
        off = i * 3 // 2
        if i % 2 == 0:
            out[off] = v & 0xFF
            out[off + 1] = (out[off + 1] & 0xF0) | (v >> 8)
        else:
            out[off] = (out[off] & 0x0F) | ((v & 0x0F) << 4)
            out[off + 1] = v >> 4
    return bytes(out)


def _short_name(name: str, index: int) -> bytes:
    base, _, ext = name.upper().rpartition(".") if "." in name else (name.upper(), "", "")
    clean = "".join(c for c in base if c.isalnum()) or "FILE"
    tail = f"~{index}"
    stem = (clean[: 8 - len(tail)] + tail).ljust(8)
    return (stem + "".join(c for c in ext if c.isalnum())[:3].ljust(3)).encode()


def _lfn_checksum(short: bytes) -> int:
    s = 0
    for b in short:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def _lfn_entries(name: str, short: bytes) -> list[bytes]:
    units = list(struct.unpack(f"<{len(name)}H", name.encode("utf-16-le")))
    units.append(0)
    while len(units) % 13:
        units.append(0xFFFF)
    chk = _lfn_checksum(short)
    parts = [units[i:i + 13] for i in range(0, len(units), 13)]
    entries = []
    for seq, part in enumerate(parts, 1):
        order = seq | (0x40 if seq == len(parts) else 0)
        raw = struct.pack("<13H", *part)
        entries.append(bytes([order]) + raw[0:10] + bytes([0x0F, 0, chk]) + raw[10:22] +
                       b"\0\0" + raw[22:26])
    return list(reversed(entries))


def _dos_datetime(t: time.struct_time) -> tuple[int, int]:
    if t.tm_year < 1980:  # FAT dates start in 1980
        t = time.gmtime(315532800)
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    tm = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return date, tm


def _dirent(short: bytes, attr: int, cluster: int, size: int, t: time.struct_time) -> bytes:
    date, tm = _dos_datetime(t)
    return struct.pack("<11sBBBHHHHHHHI", short, attr, 0, 0, tm, date, date, 0, tm, date,
                       cluster, size)


def build_vfat(files: Sequence[tuple[str, bytes]], label: str = "CIDATA",
               mtime: float | None = None) -> bytes:
    """The whole image in memory (tests, small uses); writers use :func:`vfat_regions`."""
    size, regions = vfat_regions(files, label, mtime)
    img = bytearray(size)
    for off, data in regions:
        img[off:off + len(data)] = data
    return bytes(img)


def vfat_regions(files: Sequence[tuple[str, bytes]], label: str = "CIDATA",
                 mtime: float | None = None) -> tuple[int, list[tuple[int, bytes]]]:
    """(image size, [(offset, bytes)]): everything not listed is zero, so a writer can
    leave it as a hole."""
    t = time.gmtime(time.time() if mtime is None else mtime)
    payload = sum(len(d) for _, d in files)
    spc = 1
    while True:  # sectors per cluster: keep the cluster count within FAT12 (< 4085)
        total = max(MIN_SECTORS, (payload // SECTOR + len(files) * spc) * 2 + 64)
        clusters = total // spc
        if clusters < 4085:
            break
        spc *= 2
    fat_sectors = -(-((clusters + 2) * 3 // 2 + 1) // SECTOR)
    root_sectors = ROOT_ENTRIES * 32 // SECTOR
    data_start = 1 + 2 * fat_sectors + root_sectors
    clusters = (total - data_start) // spc

    fat = [0xFF8, 0xFFF] + [0] * clusters
    root = bytearray(_dirent(label.upper().ljust(11)[:11].encode(), 0x08, 0, 0, t))
    regions: list[tuple[int, bytes]] = []
    nxt = 2
    for i, (name, data) in enumerate(files, 1):
        n = -(-len(data) // (spc * SECTOR))
        first = nxt if n else 0
        for c in range(nxt, nxt + n):
            fat[c] = c + 1 if c < nxt + n - 1 else 0xFFF
        if data:
            regions.append(((data_start + (nxt - 2) * spc) * SECTOR, data))
        nxt += n
        short = _short_name(name, i)
        for entry in _lfn_entries(name, short):
            root += entry
        root += _dirent(short, 0x20, first, len(data), t)
    if len(root) > ROOT_ENTRIES * 32 or nxt - 2 > clusters:
        raise ValueError("seed too large for the vfat writer")

    boot = bytearray(SECTOR)
    boot[0:3] = b"\xeb\x3c\x90"
    boot[3:11] = b"vmforge "
    struct.pack_into("<HBHBHHBHHHII", boot, 11, SECTOR, spc, 1, 2, ROOT_ENTRIES,
                     total if total < 65536 else 0, 0xF8, fat_sectors, 32, 64, 0,
                     total if total >= 65536 else 0)
    struct.pack_into("<BBBI11s8s", boot, 36, 0x80, 0, 0x29,
                     int.from_bytes(os.urandom(4), "little") if mtime is None else
                     int(mtime) & 0xFFFFFFFF, label.upper().ljust(11)[:11].encode(),
                     b"FAT12   ")
    boot[510:512] = b"\x55\xaa"
    fat_bytes = _fat12(fat)
    regions += [(0, bytes(boot)), (SECTOR, fat_bytes), ((1 + fat_sectors) * SECTOR, fat_bytes),
                ((1 + 2 * fat_sectors) * SECTOR, bytes(root))]
    return total * SECTOR, regions
