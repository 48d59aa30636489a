"""Where vmforge keeps things: one data directory (state.db, vms/, images/) and a build cache.

Data: ``--data-dir`` > ``$VMFORGE_HOME`` > ``$XDG_DATA_HOME/vmforge`` > ``~/.local/share/vmforge``.
Cache (downloaded packages, built image recipes, the KVM probe): ``$VMFORGE_CACHE`` >
``$XDG_CACHE_HOME/vmforge`` > ``~/.cache/vmforge``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .locations import data_root

__all__ = ["DataDir", "default_data_dir", "default_cache_dir", "VmPaths"]

# sun_path is 108 bytes; keep a margin for the socket file name.
_MAX_SOCKET_DIR = 90


def default_data_dir() -> Path:
    return Path(data_root())


def default_cache_dir() -> Path:
    if os.environ.get("VMFORGE_CACHE"):
        return Path(os.environ["VMFORGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmforge"


@dataclass(frozen=True)
class VmPaths:
    dir: Path

    @property
    def sockets(self) -> Path:
        if len(str(self.dir.resolve())) <= _MAX_SOCKET_DIR:
            return self.dir
        digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:16]
        return Path(f"/tmp/vmforge-{os.getuid()}") / digest

    @property
    def qmp(self) -> Path:
        return self.sockets / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.sockets / "agent.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.iso"

    @property
    def uefi_vars(self) -> Path:
        return self.dir / "OVMF_VARS.fd"

    def disk(self, disk_id: str) -> Path:
        return self.dir / f"disk-{disk_id}.qcow2"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def default(cls) -> DataDir:
        return cls(default_data_dir())

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def cache(self) -> Path:
        return default_cache_dir()

    def vm(self, name: str) -> VmPaths:
        return VmPaths(self.vms / name)

    def ensure(self) -> DataDir:
        """Create the directories, owner-only: stored specs and seeds carry user-data, which
        may hold passwords and tokens."""
        for p in (self.root, self.vms, self.images, self.locks):
            try:
                p.mkdir(parents=True, exist_ok=True, mode=0o700)
                mode = p.stat().st_mode
                if mode & 0o077:
                    # With a POSIX ACL the group bits are its mask: clearing them would take
                    # away what was granted on purpose (libvirt's QEMU account, by the libvirt
                    # driver); the owning group's own ACL entry stays as created (none).
                    p.chmod(0o700 | (mode & 0o070 if _has_acl(p) else 0))
            except OSError as exc:
                from .errors import VmforgeError
                raise VmforgeError(f"cannot use the data directory {p}: {exc.strerror}",
                                   hint="pick another with --data-dir or $VMFORGE_HOME, or fix "
                                        "its permissions") from None
        return self


def _has_acl(path: Path) -> bool:
    """Whether ``path`` carries an extended POSIX access ACL (named users or groups)."""
    try:
        return bool(os.getxattr(path, "system.posix_acl_access"))
    except OSError:
        return False
