"""Sizes with suffixes, everywhere a size is given: ``512M``, ``4G``, ``1.5T``, ``2048K``.

Binary units (K = KiB, M = MiB, G = GiB, T = TiB; ``Ki``/``KiB``/``KB`` spellings alike), as
QEMU, libvirt and Multipass read them. A bare number keeps the unit of the field it is given
to (MiB for ``memory_mib``, GiB for ``size_gib``).
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "to_mib", "to_gib"]

_UNITS = {"": None, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: str | int | float, default_unit: int) -> float:
    """Bytes in ``value``; a bare number is in ``default_unit`` bytes. ValueError if bad."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number or a string such as 4G")
    if isinstance(value, int | float):
        return float(value) * default_unit
    m = _SIZE.match(value) if len(value) <= 32 else None
    if not m:
        shown = value if len(value) <= 32 else value[:29] + "..."
        raise ValueError(f"{shown!r} is not a size (use a number, or a suffix: 512M, 4G, 1T)")
    unit = _UNITS[m.group(2).lower()]
    return float(m.group(1)) * (unit if unit is not None else default_unit)


def to_mib(value: str | int | float) -> int:
    """A size as whole MiB (``4G`` -> 4096; a bare number is MiB already)."""
    n = parse_size(value, 1 << 20) / (1 << 20)
    if n != int(n):
        raise ValueError(f"{str(value)[:32]!r} is not a whole number of MiB")
    return int(n)


def to_gib(value: str | int | float) -> float:
    """A size in GiB (``512M`` -> 0.5; a bare number is GiB already)."""
    return parse_size(value, 1 << 30) / (1 << 30)
