"""Memory snapshots of the API-driven VMMs (Cloud Hypervisor, Firecracker), behind the
optional driver protocol :class:`vmforge.hypervisors.base.SavesState` that
:mod:`vmforge.node.snapshots` and :mod:`vmforge.node.restore` use, the same way as QEMU's.

The saved state is one file: an uncompressed tar of the VMM's snapshot directory (Cloud
Hypervisor: ``config.json``, ``state.json``, ``memory-ranges``; Firecracker: ``vmstate`` and
``memory``) plus ``vmforge-state.json`` (which VMM and version wrote it; for Firecracker the
drive paths it will reopen). Mapping of the protocol:

- ``save_state``: pause and snapshot into ``<vm dir>/vmm-snapshot/`` (kept until the VM runs
  again: Cloud Hypervisor restores from it), then pack it into the state file.
- ``switch_disks``: neither VMM can move a running VM's disk onto a new overlay in place.
  Cloud Hypervisor: the paused VM is deleted inside the same VMM process and restored from the
  snapshot just made, its ``config.json`` naming the new overlays (same pid and sockets; the
  guest never notices). Firecracker (raw disks only): each new overlay is flattened into a raw
  copy of the layer below it, and ``PATCH /drives/{id}`` makes Firecracker reopen the file.
- ``top_nodes``: which file each disk is, read from the VMM's open files (``/proc/PID/fd``),
  so recovery sees whether the switch happened.
- ``rebase_disk``: the new overlay's header names the stored layer (Cloud Hypervisor's qcow2;
  the name is only read when the image is opened). Firecracker's raw copies name nothing.
- A start whose plan has ``incoming`` (the state file) unpacks it into
  ``<vm dir>/vmm-restore/`` and loads it into a fresh VMM with this VM's own devices (Cloud
  Hypervisor: disk, seed, tap, vsock and serial paths rewritten in ``config.json``;
  Firecracker: ``vsock_override``, ``network_overrides``, then ``PATCH /drives`` before the
  guest runs). The VM is left paused; ``resume`` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..enums import Backend
from ..errors import LaunchError, VmError
from ..fsutil import tail_text
from ..images.qcow2 import set_backing_name
from ..paths import VmPaths
from ._unixhttp import ApiResponse
from .base import ApiRequest, Liveness, Runtime

__all__ = ["ApiStateSaver", "MANIFEST", "STATE_FORMAT", "SNAPSHOT_DIR", "RESTORE_DIR",
           "pack_state", "unpack_state", "read_manifest", "open_disks", "set_backing_name",
           "vm_dir_of"]

MANIFEST = "vmforge-state.json"
STATE_FORMAT = 1
SNAPSHOT_DIR = "vmm-snapshot"  # in the VM's directory while a save is in progress
RESTORE_DIR = "vmm-restore"    # in the VM's directory: the unpacked state of a restore
SAVE_TIMEOUT_MIN = 30.0


def vm_dir_of(rt: Runtime) -> Path:
    if rt.extra.get("vm_dir"):
        return Path(rt.extra["vm_dir"])
    return Path(rt.extra["log"]).parent  # runtimes recorded before vm_dir was


# ---------------------------------------------------------------------------- the state file

def pack_state(src_dir: Path, dest: Path) -> None:
    """The files of ``src_dir`` (flat) as one uncompressed tar at ``dest`` (owner-only)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                 format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src_dir.iterdir()):
            if p.is_file():
                tar.add(p, arcname=p.name, recursive=False)
        f.flush()


def _members(tar: tarfile.TarFile, state: Path) -> list[tarfile.TarInfo]:
    out = []
    for m in tar.getmembers():
        if not m.isfile() or "/" in m.name or m.name.startswith("."):
            raise VmError(f"{state} is not a saved VM state: unexpected entry {m.name!r}")
        out.append(m)
    return out


def read_manifest(state: str | Path) -> dict[str, Any]:
    state = Path(state)
    try:
        with tarfile.open(state, mode="r:") as tar:
            names = {m.name: m for m in _members(tar, state)}
            if MANIFEST not in names:
                raise VmError(f"{state} is not a saved state of vmforge's (no {MANIFEST})")
            f = tar.extractfile(names[MANIFEST])
            assert f is not None
            data = json.loads(f.read())
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise VmError(f"cannot read the saved state {state}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise VmError(f"{state}: saved state format {data.get('format')!r}, this vmforge "
                      f"reads {STATE_FORMAT}")
    return data


def unpack_state(state: Path, dest: Path) -> dict[str, Any]:
    """Unpack the state file into ``dest`` (made empty first); its manifest."""
    manifest = read_manifest(state)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(mode=0o700, parents=True)
    with tarfile.open(state, mode="r:") as tar:
        for m in _members(tar, state):
            src = tar.extractfile(m)
            assert src is not None
            fd = os.open(dest / m.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return manifest


# ---------------------------------------------------------------------------- disk files

def open_disks(pid: int, vm_dir: Path) -> dict[str, str]:
    """Disk id -> ``dev:inode`` of the disk files the process holds open (a disk whose file
    was replaced shows the new inode once the VMM opened the new file)."""
    prefix, suffix = str(VmPaths(vm_dir).disk("\0")).split("\0")
    found: dict[str, set[str]] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link).removesuffix(" (deleted)")
            st = os.stat(link)
        except OSError:
            continue
        if target.startswith(prefix) and target.endswith(suffix):
            disk_id = target[len(prefix):len(target) - len(suffix)]
            found.setdefault(disk_id, set()).add(f"{st.st_dev}:{st.st_ino}")
    return {k: ",".join(sorted(v)) for k, v in sorted(found.items())}


# ---------------------------------------------------------------------------- the protocol

class ApiStateSaver(ABC):
    """SavesState for an API-driven VMM; mixed into ``ApiVmmDriver``, which supplies the
    calls (``_send``, ``status``, ...); each VMM supplies ``switch_disks`` and the rest below.
    """

    backend: ClassVar[Backend]
    binary_name: ClassVar[str]

    # -- supplied by ApiVmmDriver
    @abstractmethod
    def _send(self, rt: Runtime, req: ApiRequest, *, what: str,
              argv: list[str] | None = None, timeout: float | None = None) -> ApiResponse: ...

    @abstractmethod
    def status(self, rt: Runtime) -> Liveness: ...

    @abstractmethod
    def kill(self, rt: Runtime) -> Any: ...

    @abstractmethod
    def info_request(self) -> ApiRequest: ...

    @abstractmethod
    def ping_request(self) -> ApiRequest: ...

    @abstractmethod
    def snapshot_requests(self, dest_dir: str, resume: bool = True) -> list[ApiRequest]: ...

    # -- each VMM's
    @abstractmethod
    def resume_request(self) -> ApiRequest: ...

    @abstractmethod
    def switch_disks(self, rt: Runtime, overlays: Mapping[str, str]) -> None:
        """Write each disk to its new overlay (made by the caller over the old top)."""

    def saved_extra(self, rt: Runtime) -> dict[str, Any]:
        """More facts for the manifest (hook)."""
        return {}

    # -- shared
    def vmm_version(self, rt: Runtime) -> str:
        data = self._send(rt, self.ping_request(), what="version").json()
        if not isinstance(data, dict):
            return "unknown"
        return str(data.get("version") or data.get("vmm_version") or "unknown")

    def save_state(self, rt: Runtime, dest: Path, timeout: float) -> None:
        """Pause the VM and save its memory and devices into ``dest``; the VM stays paused.
        The VMM's own snapshot directory stays in the VM's directory until ``resume`` or
        ``quit`` (Cloud Hypervisor's ``switch_disks`` restores from it)."""
        work = vm_dir_of(rt) / SNAPSHOT_DIR
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        try:
            for req in self.snapshot_requests(str(work), resume=False):
                self._send(rt, req, what="snapshot", timeout=max(SAVE_TIMEOUT_MIN, timeout))
            manifest = {"format": STATE_FORMAT, "backend": self.backend.value,
                        "vmm_version": self.vmm_version(rt), **self.saved_extra(rt)}
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
            pack_state(work, dest)
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise VmError(f"saving the VM's state failed: {exc}") from exc

    def state_info(self, state: Path) -> dict[str, Any]:
        manifest = read_manifest(state)
        if manifest.get("backend") != self.backend.value:
            raise VmError(f"{state} was saved by {manifest.get('backend')}, not "
                          f"{self.backend.value}")
        return {"machine": f"{manifest['backend']} {manifest.get('vmm_version')}",
                "version": manifest["format"]}

    def top_nodes(self, rt: Runtime) -> dict[str, str]:
        return open_disks(rt.pid, vm_dir_of(rt)) if rt.pid else {}

    def rebase_disk(self, rt: Runtime, disk: str, backing: str) -> None:
        path = VmPaths(vm_dir_of(rt)).disk(disk)
        with open(path, "rb") as f:
            if f.read(4) != b"QFI\xfb":
                return  # a raw copy (Firecracker): it names no backing file
        set_backing_name(path, backing)

    def run_state(self, rt: Runtime) -> str:
        live = self.status(rt)
        return {Liveness.RUNNING: "running", Liveness.PAUSED: "paused"}.get(live, live.value)

    def resume(self, rt: Runtime) -> None:
        if self.status(rt) is Liveness.PAUSED:
            self._send(rt, self.resume_request(), what="resume")
        self._tidy(rt)

    def quit(self, rt: Runtime) -> None:
        self.kill(rt)  # saved and paused: nothing of the guest's is lost
        self._tidy(rt)

    def cancel_save(self, rt: Runtime) -> None:
        """Nothing runs in the background: a save is one call that finished or failed."""
        return None

    def incoming(self, state: Path) -> str:
        return str(state)

    def generation_id(self, rt: Runtime) -> str | None:
        return None  # neither VMM has a VM generation id device

    def wait_restored(self, rt: Runtime, vm_dir: Path, timeout: float) -> float:
        """The start loaded the state already (synchronously): check it is there, paused."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            live = self.status(rt)
            if live is Liveness.PAUSED:
                return time.monotonic() - t0
            if live in (Liveness.GONE, Liveness.CRASHED, Liveness.POWERED_OFF):
                raise LaunchError(f"{self.binary_name} did not keep the restored VM ({live})",
                                  console_tail=tail_text(rt.extra.get("log", ""), 10))
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.binary_name} is {live} after loading the saved "
                                  "state, not paused", hint=f"see {rt.extra.get('log')}")
            time.sleep(0.01)

    def _tidy(self, rt: Runtime) -> None:
        d = vm_dir_of(rt)
        shutil.rmtree(d / SNAPSHOT_DIR, ignore_errors=True)
        shutil.rmtree(d / RESTORE_DIR, ignore_errors=True)
