"""Bring disk images into the library (import from a file; pulls land here too)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError
from . import qcow2
from .library import Image, Library, check_name

__all__ = ["import_disk"]


def import_disk(library: Library, path: str | Path, name: str, *, source: str,
                move: bool = False, parent: Image | None = None,
                recipe: dict[str, object] | None = None, sha256: str | None = None) -> Image:
    """Store a qcow2 or raw disk as the next version of ``name``; ``sha256``, if given, must
    match the bytes as they are stored."""
    path = Path(path)
    check_name(name)
    if not path.is_file():
        raise ImageError(f"file not found: {path}", hint="check the path")
    info = qcow2.image_info(path)
    if info.format not in ("qcow2", "raw"):
        raise ImageError(f"{path.name}: unsupported format {info.format}",
                         hint="convert it: qemu-img convert -O qcow2 IN OUT")
    if info.backing_file and parent is None:
        raise ImageError(f"{path.name} has a backing file ({info.backing_file})",
                         hint="flatten it first: qemu-img convert -O qcow2 IN OUT")
    return library.add(name, {"disk": path}, kind="disk", format=info.format, source=source,
                       virtual_size=info.virtual_size, parent=parent, recipe=recipe, move=move,
                       sha256={"disk": sha256} if sha256 else None)
