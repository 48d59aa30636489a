"""The built-in images (``minimal``, ``debian``): build on first use, register in the library.

A spec that names one of them works on a fresh machine: the image is built (cached by its
recipe) and registered, unless the library's latest version already is that very build.
Building and registering hold a lock per data directory and image name, and the catalog is
read again once it is held: eight first uses at once make one build and one version.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..events import Progress, adapt, no_progress
from ..images.library import Image, Library, parse_ref

__all__ = ["BUILTIN", "register_minimal", "register_debian", "ensure_builtin"]



def _lock(library: Library, name: str, progress: Progress) -> AbstractContextManager[None]:
    return library.lock(f"builtin-{name}", waiting=lambda: adapt(progress, name, "image")(
        f"waiting for another vmforge that is building {name}"))


def _same_build(library: Library, name: str, key: str, files: dict[str, Path],
                progress: Progress) -> Image | None:
    """The latest version of ``name`` if it is this very build; its stored files are stored
    again (same version) if they were damaged."""
    latest = library.find(name)
    if latest is None or (latest.recipe or {}).get("key") != key:
        return None
    if library.is_intact(latest):
        return latest
    adapt(progress, name, "image")(f"{latest.ref} is damaged: storing its files again")
    return library.attach(latest, files)


def register_minimal(library: Library, cache: Path, name: str = "minimal",
                     progress: Progress = no_progress) -> Image:
    with _lock(library, name, progress):
        return _register_minimal(library, cache, name, progress)


def _register_minimal(library: Library, cache: Path, name: str, progress: Progress) -> Image:
    from .minimal import build_minimal

    art = build_minimal(cache, events=progress)
    files = {"kernel": art.vmlinuz, "vmlinux": art.vmlinux, "initrd": art.initrd}
    if same := _same_build(library, name, art.key, files, progress):
        return same
    recipe: dict[str, Any] = {**art.recipe(), "agent": True}
    return library.add(name, files, kind="kernel", cmdline=art.cmdline,
                       source="build:minimal", recipe=recipe)


def register_debian(library: Library, cache: Path, name: str = "debian",
                    progress: Progress = no_progress, recipe: Any = None) -> Image:
    with _lock(library, name, progress):
        return _register_debian(library, cache, name, progress, recipe)


def _register_debian(library: Library, cache: Path, name: str, progress: Progress,
                     recipe: Any = None) -> Image:
    from ..images.kernel import extract_vmlinux
    from ..images.qcow2 import image_info
    from .debian import build_debian

    art = build_debian(cache, recipe, events=progress)
    files = {"disk": art.disk, "kernel": art.kernel, "initrd": art.initrd}
    vmlinux = art.dir / "vmlinux"
    try:  # XZ kernels gain most from PVH; LZ4 ones (the cloud kernel) unpack fast anyway
        if not vmlinux.exists():
            extract_vmlinux(art.kernel, vmlinux)
        files["vmlinux"] = vmlinux
    except BuildError:
        pass
    if same := _same_build(library, name, art.key, files, progress):
        return same
    info = image_info(art.disk)
    return library.add(name, files, kind="disk", format="qcow2", cmdline=art.cmdline,
                       source="build:debian", recipe=art.recipe(),
                       virtual_size=info.virtual_size)


BUILTIN: dict[str, Callable[..., Image]] = {"minimal": register_minimal,
                                            "debian": register_debian}
_UNLOCKED: dict[str, Callable[[Library, Path, str, Progress], Image]] = {
    "minimal": _register_minimal, "debian": _register_debian}


def ensure_builtin(library: Library, cache: Path, ref: str,
                   progress: Progress = no_progress) -> Image | None:
    """The built-in image ``ref`` names (latest version), built if the library lacks it;
    None if ``ref`` is not a built-in name or pins a version."""
    name, version = parse_ref(ref)
    if name not in BUILTIN or version is not None:
        return None
    if (img := library.find(name)) is not None:
        return img
    with _lock(library, name, progress):
        if (img := library.find(name)) is not None:  # built while we waited for the lock
            return img
        adapt(progress, name, "image")(
            f"image {name} is not in the library yet: building it (cached by recipe)")
        return _UNLOCKED[name](library, cache, name, progress)
