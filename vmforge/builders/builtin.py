"""The built-in images (``minimal``, ``debian``): build on first use, register in the library.

A spec that names one of them works on a fresh machine: the image is built (cached by its
recipe) and registered, unless the library's latest version already is that very build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..images.library import Image, Library, parse_ref

__all__ = ["BUILTIN", "register_minimal", "register_debian", "ensure_builtin"]

Progress = Callable[[str], None]


def register_minimal(library: Library, cache: Path, name: str = "minimal",
                     progress: Progress = lambda _m: None) -> Image:
    from .minimal import build_minimal

    art = build_minimal(cache, progress=progress)
    latest = library.find(name)
    if latest and (latest.recipe or {}).get("key") == art.key:
        return latest
    recipe: dict[str, Any] = {**art.recipe(), "agent": True}
    return library.add(name, {"kernel": art.vmlinuz, "vmlinux": art.vmlinux,
                              "initrd": art.initrd}, kind="kernel", cmdline=art.cmdline,
                       source="build:minimal", recipe=recipe)


def register_debian(library: Library, cache: Path, name: str = "debian",
                    progress: Progress = lambda _m: None, recipe: Any = None) -> Image:
    from ..images.kernel import extract_vmlinux
    from ..images.qcow2 import image_info
    from .debian import build_debian

    art = build_debian(cache, recipe, progress=progress)
    latest = library.find(name)
    if latest and (latest.recipe or {}).get("key") == art.key:
        return latest
    files = {"disk": art.disk, "kernel": art.kernel, "initrd": art.initrd}
    vmlinux = art.dir / "vmlinux"
    try:  # XZ kernels gain most from PVH; LZ4 ones (the cloud kernel) unpack fast anyway
        if not vmlinux.exists():
            extract_vmlinux(art.kernel, vmlinux)
        files["vmlinux"] = vmlinux
    except BuildError:
        pass
    info = image_info(art.disk)
    return library.add(name, files, kind="disk", format="qcow2", cmdline=art.cmdline,
                       source="build:debian", recipe=art.recipe(),
                       virtual_size=info.virtual_size)


BUILTIN: dict[str, Callable[..., Image]] = {"minimal": register_minimal,
                                            "debian": register_debian}


def ensure_builtin(library: Library, cache: Path, ref: str,
                   progress: Progress = lambda _m: None) -> Image | None:
    """Build a missing built-in image named by ``ref``; None if ``ref`` is not built-in."""
    name, version = parse_ref(ref)
    if name not in BUILTIN or library.find(ref) is not None or version not in (None,):
        return None
    progress(f"image {name} is not in the library yet: building it (cached by recipe)")
    return BUILTIN[name](library, cache, name, progress)
