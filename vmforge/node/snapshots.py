"""Memory snapshots: a running VM's memory, devices and disks saved as one library object.

A snapshot is an image of kind ``snapshot`` in the library (content-addressed, checksummed,
listed with its parent image, ``vmforge image verify`` re-hashes it): its ``state`` file (the
hypervisor's saved memory and device state), one ``layer:<disk id>`` per disk (the VM's
overlay as it was, read-only from then on) and, under UEFI, its ``nvram``. Its recipe (the
metadata) carries the VM's spec, the hypervisor's version and machine type, the images it
builds on (``uses``) and the VM's NICs. Restoring one is in :mod:`vmforge.node.restore`.

Taking one (``create``), under the VM's lock, with the row in ``snapshotting``:

1. the journal ``DIR/snapshot.json`` names every file the steps below make;
2. the hypervisor pauses the VM and saves its state to a temporary file in the library;
3. each disk's overlay P gets a second name S in the VM's directory (a hard link: the layer,
   no copy), a new empty overlay T over S is made and renamed over P;
4. the hypervisor switches each disk to the new P (the old image, S, is only read from now on)
   and the VM runs again (or, with ``stop``, its process ends);
5. the state and the layers (further links of S) go into the library in one transaction that
   also pins the snapshot to the VM; then each new overlay's header is pointed at the
   library's copy of its layer (QEMU writes the header itself), and S is removed.

At every step the VM's disk chain on disk is consistent: P is either the old overlay, or a new
overlay over S, or a new overlay over the stored layer. A vmforge that dies on the way leaves
the row ``snapshotting`` with its lock free; the next command that reads it runs ``recover``,
which undoes a switch the hypervisor never made, removes spare names and temporary files, and
resumes the VM (or records it stopped if its process is gone). A snapshot whose transaction
committed stays valid.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import ImageError, InvalidState, SpecError, VmError, VmforgeError
from ..events import Event, Progress, no_progress
from ..failpoints import hit
from ..fsutil import fsync_dir
from ..hypervisors.base import Liveness, SavesState, SnapshotsInOneStep
from ..images import qcow2
from ..images.library import LAYER_ROLE, SNAPSHOT_KIND, Image, check_name, parse_ref, sha256_file
from .states import ExitReason, VmState

if TYPE_CHECKING:
    from ..hypervisors.base import Driver, Runtime
    from ..spec import VmRequest
    from .manager import VmManager, VmRecord

__all__ = ["Snapshot", "find", "get", "all_snapshots", "users", "remove", "create",
           "recover", "check_snapshottable", "saver", "JOURNAL", "FORMAT", "PIN_PREFIX"]

JOURNAL = "snapshot.json"
FORMAT = 1            # of the snapshot's recipe
PIN_PREFIX = "snapshot:"  # vm_images role of a VM whose disks (or memory) come from one


@dataclass(frozen=True)
class Snapshot:
    image: Image

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.image.recipe or {})

    @property
    def ref(self) -> str:
        return self.image.ref

    @property
    def state(self) -> Path | None:
        return self.image.path("state")

    def layer(self, disk_id: str) -> Path | None:
        return self.image.path(LAYER_ROLE + disk_id)

    def as_dict(self, *, users: list[str] | None = None, parent: str | None = None,
                show_secrets: bool = False) -> dict[str, Any]:
        from .manager import redact_spec
        meta = self.meta
        raw = meta.get("spec")
        spec: dict[str, Any] = raw if isinstance(raw, dict) else {}
        files = {role: {"sha256": d, "path": str(self.image.path(role)),
                        "size": _size(self.image.path(role))}
                 for role, d in self.image.files.items()}
        return {"name": self.image.name, "version": self.image.version, "ref": self.ref,
                "id": self.image.id, "source_vm": meta.get("source_vm"),
                "created_at": self.image.created_at, "size": self.image.size,
                "parent": parent, "backend": meta.get("backend"),
                "hypervisor_version": meta.get("hypervisor_version"),
                "machine_type": meta.get("machine_type"), "accel": meta.get("accel"),
                "memory_mib": spec.get("memory_mib"), "cpu_cores": spec.get("cpu_cores"),
                "disks": sorted(meta.get("disks", {})), "files": files,
                "paused_seconds": meta.get("paused_seconds"), "users": users or [],
                "spec": spec if show_secrets else redact_spec(spec)}


def _size(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path else None
    except OSError:
        return None


# ---------------------------------------------------------------------------- lookups

def find(m: VmManager, ref: str) -> Snapshot | None:
    img = m.library.find(ref)
    return Snapshot(img) if img is not None and img.kind == SNAPSHOT_KIND else None


def get(m: VmManager, ref: str) -> Snapshot:
    parse_ref(ref)
    snap = find(m, ref)
    if snap is None:
        img = m.library.find(ref)
        if img is not None:
            raise ImageError(f"{ref} is an image of kind {img.kind}, not a snapshot",
                             hint="see `vmforge snapshot ls`")
        raise ImageError(f"no snapshot {ref!r}", hint="see `vmforge snapshot ls`")
    return snap


def all_snapshots(m: VmManager) -> list[Snapshot]:
    return [Snapshot(i) for i in m.library.all() if i.kind == SNAPSHOT_KIND]


def users(m: VmManager, snap: Snapshot) -> list[str]:
    """The VMs that need it: clones (their memory and disks come from it) and the VMs whose
    disks were layered on it."""
    return [r["vm_name"] for r in m.db.query(
        "SELECT vm_name FROM vm_images WHERE image_id=? ORDER BY vm_name", (snap.image.id,))]


def remove(m: VmManager, ref: str) -> Snapshot:
    """Delete a snapshot nothing uses: no VM (clone, pool member, or the VM whose disks now
    build on its layers), no warm pool, no later snapshot."""
    snap = get(m, ref)
    from .pools import all_pools
    using = [p.name for p in all_pools(m) if p.snapshot_id == snap.image.id]
    if using:
        raise ImageError(f"snapshot {snap.ref} is in use by warm pool(s) {', '.join(using)}",
                         hint="`vmforge pool rm` them first")
    vms = users(m, snap)
    if vms:
        raise ImageError(f"snapshot {snap.ref} is in use by VM(s) {', '.join(vms)} (clones, "
                         "or VMs whose disks build on its layers)",
                         hint="remove those VMs first (`vmforge rm -f NAME`)")
    m.library.remove(snap.ref)
    return snap


# ---------------------------------------------------------------------------- checks

def saver(drv: Driver) -> SavesState:
    if not drv.capabilities().snapshots or not isinstance(drv, SavesState):
        raise SpecError(f"{drv.backend.value} cannot save or restore a VM's memory here",
                        field="spec.hypervisor", hint="use hypervisor: qemu or libvirt")
    return drv


def check_snapshottable(req: VmRequest, drv: Driver) -> SavesState:
    """What a VM must be for its memory and disks to be saved and cloned; field-named."""
    state = saver(drv)
    spec = req.spec
    if spec.mounts:
        raise SpecError("a VM with host folders cannot be snapshotted (9p state is not "
                        "saved)", field="spec.mounts[0]", hint="remove the mounts")
    for i, d in enumerate(spec.disks):
        if not (d.backing_file or d.image) and d.format.value != "qcow2":
            raise SpecError(f"disk {d.id} is {d.format.value}; snapshots layer qcow2 disks "
                            "only", field=f"spec.disks[{i}].format", hint="format: qcow2")
    for i, n in enumerate(spec.nics):
        if n.ip and (n.network or n.bridge):
            raise SpecError("a static address cannot be cloned: every clone would have it",
                            field=f"spec.nics[{i}].ip", hint="use DHCP on this network")
    return state


# ---------------------------------------------------------------------------- journal

def _journal_path(rec: VmRecord) -> Path:
    return rec.dir / JOURNAL


def _write_journal(rec: VmRecord, data: dict[str, Any]) -> None:
    path = _journal_path(rec)
    tmp = path.with_name(f".{JOURNAL}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(rec.dir)


def _read_journal(rec: VmRecord) -> dict[str, Any] | None:
    try:
        data = json.loads(_journal_path(rec).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def backing_name(path: Path) -> str | None:
    """The backing file named in a qcow2 header (None: none, or not a qcow2 file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if head[:4] != b"QFI\xfb":
                return None
            off, size = struct.unpack(">QI", head[8:20])
            if not off:
                return None
            f.seek(off)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------------------- create

def create(m: VmManager, vm: str, name: str | None = None, *, stop: bool = False,
           progress: Progress = no_progress, timeout: float = 120.0) -> Snapshot:
    """Save a running VM's memory, devices and disks as the snapshot ``name`` (default
    ``VM-snap``; each call adds a version). The VM runs on afterwards on new overlays over
    the snapshot's layers, or is stopped (``stop``)."""
    name = name or f"{vm}-snap"
    check_name(name)
    existing = m.library.find(name)
    if existing is not None and existing.kind != SNAPSHOT_KIND:
        raise ImageError(f"{name!r} is the name of an image already", hint="pick another --name")
    lock = m._lock(vm)
    lock.acquire()
    try:
        rec = m._current(vm)
        if rec.state is not VmState.RUNNING or rec.runtime is None:
            raise InvalidState(f"VM {vm} is {rec.state.value}: a snapshot saves a running "
                               "VM's memory", hint=f"`vmforge start {vm}` first")
        drv = m.driver(rec.backend)
        state = check_snapshottable(rec.req, drv)
        if isinstance(drv, SnapshotsInOneStep):
            return _create_in_one_step(m, rec, drv, state, name, stop, progress, timeout)
        return _create_locked(m, rec, drv, state, name, stop, progress, timeout)
    finally:
        m._settle_net(vm)
        lock.release()


def _create_locked(m: VmManager, rec: VmRecord, drv: Driver, saver_: SavesState, name: str,
                   stop: bool, progress: Progress, timeout: float) -> Snapshot:
    vm = rec.name
    rt = rec.runtime
    assert rt is not None
    req = rec.req
    token = f"{time.time_ns():x}"
    lib = m.library
    lib.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Named like the library's own temporaries (in-<pid>-...): swept when we are gone.
    state_tmp = lib.tmp / f"in-{os.getpid()}-state-{token}"
    disks: dict[str, dict[str, str]] = {}
    for disk in req.spec.disks:
        disks[disk.id] = {"p": str(rec.paths.disk(disk.id)),
                          "s": str(rec.dir / f"layer-{disk.id}-{token}.qcow2"),
                          "t": str(rec.dir / f".disk-{disk.id}.next-{token}.qcow2"),
                          "s2": str(lib.tmp / f"in-{os.getpid()}-layer-{disk.id}-{token}")}
    generation = saver_.generation_id(rt)
    journal: dict[str, Any] = {"op": "snapshot", "name": name, "stop": stop, "token": token,
                               "state": str(state_tmp), "disks": disks, "saved": False,
                               "nodes": saver_.top_nodes(rt) if disks else {},
                               "generation": generation}
    _write_journal(rec, journal)
    m._transition(vm, (VmState.RUNNING,), VmState.SNAPSHOTTING)
    progress(Event(vm, "state", VmState.SNAPSHOTTING.value))
    hit("snapshot.journal")
    try:
        t0 = time.monotonic()
        progress(Event(vm, "snapshot", "saving memory and device state"))
        try:
            saver_.save_state(rt, state_tmp, timeout)
        except VmforgeError:
            state_tmp.unlink(missing_ok=True)
            raise
        saved_s = time.monotonic() - t0
        _write_journal(rec, {**journal, "saved": True})  # a switch from here on is finished
        hit("snapshot.saved")
        info = saver_.state_info(state_tmp)
        for d in disks.values():  # the old overlay keeps a second name: the layer
            p, s, t = Path(d["p"]), Path(d["s"]), Path(d["t"])
            os.link(p, s)
            _, vsize = qcow2.probe_format(p)
            qcow2.create_overlay(s, t, vsize, backing_format="qcow2")
            os.chmod(t, 0o600)
        hit("snapshot.overlays")
        for d in disks.values():
            os.rename(d["t"], d["p"])
        if disks:
            fsync_dir(rec.dir)
        hit("snapshot.renamed")
        if stop:
            saver_.quit(rt)
        else:
            saver_.switch_disks(rt, {disk_id: d["p"] for disk_id, d in disks.items()})
            hit("snapshot.switched")
            saver_.resume(rt)
        paused_s = time.monotonic() - t0
        progress(Event(vm, "snapshot", f"VM paused {paused_s:.2f}s; storing the snapshot"))
        hit("snapshot.resumed")
        snap = _store(m, rec, name, state_tmp, disks,
                      {**info, "generation_id": generation}, paused_s, saved_s, token)
        hit("snapshot.stored")
        for disk_id, d in disks.items():
            blob = snap.layer(disk_id)
            assert blob is not None
            if stop:  # nothing ran on the new overlay: make it again over the stored layer
                t = Path(d["t"])
                _, vsize = qcow2.probe_format(Path(d["p"]))
                qcow2.create_overlay(blob, t, vsize, backing_format="qcow2")
                os.chmod(t, 0o600)
                os.rename(t, d["p"])
            else:
                saver_.rebase_disk(rt, disk_id, str(blob))
            Path(d["s"]).unlink()
        hit("snapshot.rebased")
        _finish(m, rec, stopped=stop)
        progress(Event(vm, "state", VmState.STOPPED.value if stop else VmState.RUNNING.value))
        return snap
    except BaseException:
        _undo(m, vm, rec)
        raise


def _undo(m: VmManager, vm: str, rec: VmRecord) -> None:
    """After a failed snapshot: undo or finish what its steps did, exactly as a later command
    would; the VM itself is fine (the error is the snapshot's, raised to the caller)."""
    row = m._row(vm)
    if row is not None and row.state is VmState.SNAPSHOTTING:
        recover(m, row, why=None)
    else:
        _journal_path(rec).unlink(missing_ok=True)


def _create_in_one_step(m: VmManager, rec: VmRecord, drv: Any, saver_: SavesState,
                        name: str, stop: bool, progress: Progress,
                        timeout: float) -> Snapshot:
    """``create`` for a hypervisor that saves memory and switches disks in one call
    (:class:`SnapshotsInOneStep`: libvirt). Its new overlays get new paths T (the disk's own
    path P cannot be reused while it is open), and their headers name, from the start, the
    library path the old overlay will be stored at (its sha256, read while the VM is paused),
    so no overlay is ever rebased while the hypervisor writes it:

    1. the journal; the VM paused; each overlay P gets a second name S (the layer) and is
       hashed; a new overlay T over ``blobs/SHA256`` (not there yet: the hypervisor attaches
       the open image as T's backing and never opens that name);
    2. the hypervisor saves the state and switches each disk to T (and, ``stop``, ends the VM);
    3. P becomes a name of T too (the disk's path for later starts; the running hypervisor
       keeps T's own name until its next snapshot, when it reopens that image read-only by
       it), the VM's next-start definition says P, and the VM runs again;
    4. the state and the layers S go into the library (``blobs/SHA256`` appears), pinned.
    """
    vm = rec.name
    rt = rec.runtime
    assert rt is not None
    token = f"{time.time_ns():x}"
    lib = m.library
    lib.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_tmp = lib.tmp / f"in-{os.getpid()}-state-{token}"
    disks: dict[str, dict[str, str]] = {}
    for disk in rec.req.spec.disks:
        disks[disk.id] = {"p": str(rec.paths.disk(disk.id)),
                          "s": str(rec.dir / f"layer-{disk.id}-{token}.qcow2"),
                          "t": str(rec.dir / f".disk-{disk.id}.top-{token}.qcow2"),
                          "s2": str(lib.tmp / f"in-{os.getpid()}-layer-{disk.id}-{token}"),
                          "b": ""}
    generation = saver_.generation_id(rt)
    journal: dict[str, Any] = {"op": "snapshot", "mode": "one-step", "name": name,
                               "stop": stop, "token": token, "state": str(state_tmp),
                               "disks": disks, "saved": False, "generation": generation}
    _write_journal(rec, journal)
    m._transition(vm, (VmState.RUNNING,), VmState.SNAPSHOTTING)
    progress(Event(vm, "state", VmState.SNAPSHOTTING.value))
    hit("snapshot.journal")
    try:
        t0 = time.monotonic()
        drv.pause(rt)
        for d in disks.values():
            p, s, t = Path(d["p"]), Path(d["s"]), Path(d["t"])
            os.link(p, s)
            d["b"] = str(lib.blob_path(sha256_file(s)))
            _, vsize = qcow2.probe_format(p)
            qcow2.create_overlay(s, t, vsize, backing_format="qcow2")
            qcow2.set_backing_name(t, d["b"])
            os.chmod(t, 0o600)
        journal["disks"] = disks
        _write_journal(rec, journal)
        hit("snapshot.overlays")
        progress(Event(vm, "snapshot", "saving memory and device state"))
        try:
            drv.snapshot(rt, state_tmp, {k: d["t"] for k, d in disks.items()}, stop=stop,
                         timeout=timeout)
        except VmforgeError:
            state_tmp.unlink(missing_ok=True)
            raise
        saved_s = time.monotonic() - t0
        journal["saved"] = True
        _write_journal(rec, journal)
        hit("snapshot.switched")
        info = saver_.state_info(state_tmp)
        _take_overlays(rec, drv, rt, disks, stop)
        hit("snapshot.renamed")
        if not stop:
            saver_.resume(rt)
        paused_s = time.monotonic() - t0
        progress(Event(vm, "snapshot", f"VM paused {paused_s:.2f}s; storing the snapshot"))
        hit("snapshot.resumed")
        snap = _store(m, rec, name, state_tmp, disks, {**info, "generation_id": generation},
                      paused_s, saved_s, token)
        _check_layers(snap, disks)
        hit("snapshot.stored")
        _finish(m, rec, stopped=stop)
        progress(Event(vm, "state", VmState.STOPPED.value if stop else VmState.RUNNING.value))
        return snap
    except BaseException:
        _undo(m, vm, rec)
        raise


def _take_overlays(rec: VmRecord, drv: Any, rt: Runtime, disks: dict[str, dict[str, str]],
                   stop: bool) -> None:
    """After the switch: P names the new overlay T (T keeps its own name while the
    hypervisor runs on it), the VM's next start uses P, older T names go."""
    for d in disks.values():
        p, t = Path(d["p"]), Path(d["t"])
        if not t.exists():
            continue  # done before (recovery)
        if stop:
            os.replace(t, p)
        elif not _same_file(p, t):  # (rename(2) of two links of one file does nothing)
            tmp = rec.dir / f".{p.name}.link-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.link(t, tmp)
            os.replace(tmp, p)
    if disks:
        fsync_dir(rec.dir)
        drv.adopt_disks(rt, {k: d["p"] for k, d in disks.items()})
    for disk_id, d in disks.items():  # the images they name are read-only backings now
        for old in rec.dir.glob(f".disk-{disk_id}.top-*.qcow2"):
            if str(old) != d["t"]:
                old.unlink(missing_ok=True)


def _check_layers(snap: Snapshot, disks: dict[str, dict[str, str]]) -> None:
    """Each new overlay names its layer's library path: the stored layer must be there, and
    S (its second name in the VM's directory) goes."""
    for disk_id, d in disks.items():
        blob = snap.layer(disk_id)
        if blob is None or str(blob) != d["b"]:
            if not os.path.exists(d["b"]):  # keep the VM's chain readable, say so
                os.link(d["s"], d["b"])
            raise VmError(f"disk {disk_id}'s overlay changed while the VM was paused "
                          f"(stored as {blob}, expected {d['b']})")
        Path(d["s"]).unlink(missing_ok=True)


def _alive(drv: Any, rt: Runtime | None) -> bool:
    """Whether the hypervisor process of ``rt`` still holds the VM (running or paused)."""
    if rt is None:
        return False
    try:
        return bool(drv.status(rt) in (Liveness.RUNNING, Liveness.PAUSED))
    except VmforgeError:
        return False


def _recover_in_one_step(m: VmManager, rec: VmRecord, journal: dict[str, Any],
                         why: str | None) -> VmRecord | None:
    """``recover`` for :func:`_create_in_one_step`. The hypervisor switched the disks or it
    did not (one call, all disks): if it did (the VM runs on T, or T was renamed to P
    already), the snapshot is finished; else it is undone. The VM then runs again, or ends
    if the snapshot was finished with ``stop``."""
    drv = m.driver(rec.backend)
    state = drv if isinstance(drv, SavesState) else None
    rt = rec.runtime
    alive = _alive(drv, rt)
    disks = cast(dict[str, dict[str, str]], journal.get("disks") or {})
    state_file = Path(str(journal.get("state")))
    tops: dict[str, str] = {}
    if rt is not None and state is not None:
        try:
            if alive:
                state.cancel_save(rt)  # a job of the dead process runs on in the hypervisor
            tops = state.top_nodes(rt) if disks else {}
        except VmforgeError:
            tops = {}
    switched = False
    for disk_id, d in disks.items():
        if d.get("b") and (backing_name(Path(d["p"])) == d["b"]
                           or tops.get(disk_id[:20]) == d["t"]):
            switched = True
    if not disks:
        switched = bool(journal.get("saved")) and _complete(state, state_file)
    problems: list[str] = []
    stop = bool(journal.get("stop"))
    if switched:
        try:
            if rt is not None:
                _take_overlays(rec, drv, rt, disks, stop or not alive)
            snap = _committed(m, str(journal.get("token")))
            if snap is None:
                if not journal.get("saved") and not _complete(state, state_file):
                    raise VmError("its saved state is incomplete")
                tmp = m.library.tmp
                mine = tmp / f"in-{os.getpid()}-state-{journal.get('token')}"
                os.replace(state_file, mine)
                ds = {k: {**d, "s2": str(tmp / f"in-{os.getpid()}-layer-{k}-"
                                           f"{journal.get('token')}")}
                      for k, d in disks.items()}
                info = {**read_info(state, mine), "generation_id": journal.get("generation")}
                try:
                    snap = _store(m, rec, str(journal["name"]), mine, ds, info, None, None,
                                  str(journal.get("token")))
                finally:
                    mine.unlink(missing_ok=True)
            _check_layers(snap, disks)
        except (VmforgeError, OSError) as exc:
            problems.append(f"the snapshot could not be finished ({exc})")
    else:
        for d in disks.values():
            Path(d["t"]).unlink(missing_ok=True)
            Path(d["s"]).unlink(missing_ok=True)
    for d in disks.values():
        Path(d["s2"]).unlink(missing_ok=True)
    state_file.unlink(missing_ok=True)
    if alive and rt is not None and state is not None:
        try:
            if switched and stop:
                state.quit(rt)
                alive = False
            else:
                state.resume(rt)
        except VmforgeError as exc:
            problems.append(f"{'stopping' if switched and stop else 'resuming'} the VM "
                            f"failed: {exc.message}")
    error = "; ".join([*([why] if why else []), *problems]) or None
    if alive and rt is not None and drv.status(rt) in (Liveness.RUNNING, Liveness.PAUSED):
        _finish(m, rec, stopped=False, error=error)
    else:
        _finish(m, rec, stopped=True, error=None if stop and switched and not problems
                else error)
    return m._row(rec.name)


def _complete(state: SavesState | None, path: Path) -> bool:
    try:
        return state is not None and path.is_file() and bool(state.state_info(path))
    except VmforgeError:
        return False


def _store(m: VmManager, rec: VmRecord, name: str, state_tmp: Path,
           disks: dict[str, dict[str, str]], info: dict[str, Any], paused_s: float | None,
           saved_s: float | None, token: str) -> Snapshot:
    from . import plan as planmod
    req = rec.req
    lib = m.library
    pins = m._pins(rec.name)
    parent = _parent(m, rec, pins)
    files: dict[str, str | Path] = {"state": state_tmp}
    for disk_id, d in disks.items():
        os.link(d["s"], d["s2"])  # consumed (moved into the store) by add
        files[LAYER_ROLE + disk_id] = d["s2"]
    if rec.paths.uefi_vars.exists():
        files["nvram"] = rec.paths.uefi_vars
    host = m.host()
    nets = m._nets(req)
    resolved = planmod.resolve_nics(req, nets)
    uses = sorted(set(pins.values()))
    meta = {"format": FORMAT, "source_vm": rec.name,
            "spec": json.loads(req.model_dump_json(by_alias=True))["spec"],
            "backend": rec.backend.value, "accel": rec.accel,
            "hypervisor_version": host.qemu_version, "machine_type": info.get("machine"),
            "state_format": info.get("version"), "pins": pins, "uses": uses,
            "disks": {disk_id: {"backing": backing_name(Path(d["s"]))}
                      for disk_id, d in disks.items()},
            "backing_files": _backing_stamps(req),
            "nics": [{"id": n.id, "mac": n.mac, "dhcp": n.dhcp, "on_host": n.mode.on_host}
                     for n in resolved],
            "generation_id": info.get("generation_id"),
            "paused_seconds": None if paused_s is None else round(paused_s, 3),
            "saved_seconds": None if saved_s is None else round(saved_s, 3),
            "token": token}

    def pin(c: Any, image_id: int) -> None:  # the VM's disks now build on the layers
        if disks:
            c.execute("INSERT OR REPLACE INTO vm_images (vm_name, role, image_id) "
                      "VALUES (?,?,?)", (rec.name, f"{PIN_PREFIX}{image_id}", image_id))
    img = lib.add(name, files, kind=SNAPSHOT_KIND, parent=parent, source=f"vm:{rec.name}",
                  recipe=meta, move=True, on_record=pin)
    for d in disks.values():
        Path(d["s2"]).unlink(missing_ok=True)  # a copy was stored (another filesystem)
    return Snapshot(img)


def _parent(m: VmManager, rec: VmRecord, pins: dict[str, int]) -> Image | None:
    """Lineage: the newest snapshot the first disk builds on, else the image it came from,
    else the kernel image."""
    snaps = sorted((i for role, i in pins.items() if role.startswith(PIN_PREFIX)),
                   reverse=True)
    for image_id in snaps:
        return m.library.get(image_id)
    spec = rec.req.spec
    for d in spec.disks:
        if f"disk:{d.id}" in pins:
            return m.library.get(pins[f"disk:{d.id}"])
    if "kernel" in pins:
        return m.library.get(pins["kernel"])
    return None


def _backing_stamps(req: VmRequest) -> dict[str, list[int]]:
    """Size and mtime of the spec's own backing files (outside the library): a restore
    refuses them changed."""
    out = {}
    for d in req.spec.disks:
        if d.backing_file:
            st = os.stat(d.backing_file)
            out[str(d.backing_file)] = [st.st_size, st.st_mtime_ns]
    return out


def _finish(m: VmManager, rec: VmRecord, *, stopped: bool, error: str | None = None) -> None:
    _journal_path(rec).unlink(missing_ok=True)
    if stopped:
        m._set(rec.name, state=VmState.STOPPED.value, runtime=None, stopped_at=time.time(),
               stop_reason=ExitReason.STOPPED.value, last_error=error)
    else:
        m._set(rec.name, state=VmState.RUNNING.value, last_error=error)


# ---------------------------------------------------------------------------- recovery

_INTERRUPTED = "a snapshot was interrupted (the vmforge process taking it died)"


def recover(m: VmManager, rec: VmRecord, why: str | None = _INTERRUPTED) -> VmRecord | None:
    """Finish or undo an interrupted snapshot (``snapshotting``) or restore (``restoring``);
    the caller holds the VM's lock. ``why`` becomes the VM's last error.

    A snapshot whose disks the hypervisor had not switched yet is undone (the old overlay is
    P again); one whose disks were switched is finished: its state and layers are stored
    (unless that committed already) and the new overlays are pointed at the stored layers, so
    no VM keeps a layer of its own. Whatever cannot be finished leaves a consistent chain (the
    new overlay over the VM-local layer) and says so in the VM's last error."""
    if rec.state is VmState.RESTORING:
        from .restore import discard
        discard(m, rec)
        return None
    if rec.state is not VmState.SNAPSHOTTING:
        return rec
    journal = _read_journal(rec) or {}
    if journal.get("mode") == "one-step":
        return _recover_in_one_step(m, rec, journal, why)
    drv = m.driver(rec.backend)
    state = drv if isinstance(drv, SavesState) else None
    rt = rec.runtime
    alive = _alive(drv, rt)
    disks = cast(dict[str, dict[str, str]], journal.get("disks") or {})
    nodes_now: dict[str, str] = {}
    if alive and state is not None and rt is not None:
        try:
            state.cancel_save(rt)
            nodes_now = state.top_nodes(rt) if disks else {}
        except VmforgeError:  # its monitor does not answer: it cannot be trusted to resume
            drv.kill(rt)
            alive = False
    problems: list[str] = []
    switched: dict[str, dict[str, str]] = {}
    for disk_id, d in disks.items():
        p, s, t, s2 = (Path(d[k]) for k in ("p", "s", "t", "s2"))
        t.unlink(missing_ok=True)
        s2.unlink(missing_ok=True)
        if not s.exists():
            continue
        if _same_file(p, s):  # the new overlay never took P's place
            s.unlink()
            continue
        if backing_name(p) != str(s):
            s.unlink()  # P names the stored layer already: S is a spare name
            continue
        state_file = Path(str(journal.get("state")))
        if alive:  # finished only if the hypervisor writes the new overlay already
            finish = nodes_now.get(disk_id) != (journal.get("nodes") or {}).get(disk_id)
        else:  # gone: the new overlay over S is the disk either way; finish if we can
            finish = not _empty_overlay(p) or bool(journal.get("saved")) and \
                state_file.is_file()
        if finish:
            switched[disk_id] = d
        else:
            os.rename(s, p)  # the hypervisor writes (or wrote) the old image: P again
    memory_only = not disks and bool(journal.get("saved")) and \
        Path(str(journal.get("state"))).is_file()
    finishing = bool(switched) or memory_only
    # Run the guest again (or end it, as asked, if the snapshot is being finished) before
    # finishing: QEMU edits an image's header (change-backing-file) only while its images
    # are active, i.e. not postmigrate.
    stop = bool(journal.get("stop")) and finishing
    if alive and state is not None and rt is not None:
        try:
            if stop:
                state.quit(rt)
                alive = False
            else:
                state.resume(rt)
        except VmforgeError as exc:
            problems.append(f"{'stopping' if stop else 'resuming'} the VM failed: "
                            f"{exc.message}")
    if finishing:
        try:
            _roll_forward(m, rec, journal, switched, alive, state, rt)
        except (VmforgeError, OSError) as exc:
            problems.append(f"the snapshot could not be finished ({exc}); the VM's disks "
                            "build on layers in its directory")
    if journal.get("state"):
        Path(journal["state"]).unlink(missing_ok=True)
    error = "; ".join([*([why] if why else []), *problems]) or None
    if alive and rt is not None and drv.status(rt) in (Liveness.RUNNING, Liveness.PAUSED):
        _finish(m, rec, stopped=False, error=error)
    else:
        if rt is not None:
            try:
                drv.kill(rt)
            except VmforgeError:
                pass
        _finish(m, rec, stopped=True, error=None if journal.get("stop") and not problems
                else error)
    return m._row(rec.name)


def _empty_overlay(path: Path) -> bool:
    """Whether a qcow2 image has no cluster of its own (its L1 table is all zero)."""
    try:
        with open(path, "rb") as f:
            head = f.read(48)
            if head[:4] != b"QFI\xfb":
                return False
            l1_size = struct.unpack(">I", head[36:40])[0]
            l1_off = struct.unpack(">Q", head[40:48])[0]
            f.seek(l1_off)
            return not any(f.read(l1_size * 8))
    except OSError:
        return False


def _roll_forward(m: VmManager, rec: VmRecord, journal: dict[str, Any],
                  switched: dict[str, dict[str, str]], alive: bool,
                  state: SavesState | None, rt: Runtime | None) -> bool:
    """Store the snapshot whose disks were switched (if it did not commit), and point each
    switched overlay at its stored layer; True once done."""
    token = str(journal.get("token"))
    snap = _committed(m, token)
    if snap is None:
        state_file = Path(str(journal.get("state")))
        if not journal.get("saved") or not state_file.is_file():
            raise VmError("its saved state is incomplete")
        # The dead process's temporaries are swept by the next store: make them ours.
        tmp = m.library.tmp
        mine = tmp / f"in-{os.getpid()}-state-{token}"
        os.replace(state_file, mine)
        switched = {k: {**d, "s2": str(tmp / f"in-{os.getpid()}-layer-{k}-{token}")}
                    for k, d in switched.items()}
        info = {**read_info(state, mine), "generation_id": journal.get("generation")}
        try:
            snap = _store(m, rec, str(journal["name"]), mine, switched, info, None, None,
                          token)
        finally:
            mine.unlink(missing_ok=True)
    for disk_id, d in switched.items():
        blob = snap.layer(disk_id)
        if blob is None:
            raise VmError(f"the snapshot has no layer for disk {disk_id}")
        if alive and state is not None and rt is not None:
            state.rebase_disk(rt, disk_id, str(blob))
        else:
            _rebase_offline(Path(d["p"]), blob)
        Path(d["s"]).unlink()
    return True


def read_info(state: SavesState | None, path: Path) -> dict[str, Any]:
    return state.state_info(path) if state is not None else {}


def _rebase_offline(overlay: Path, backing: Path) -> None:
    from .. import run
    run.run([run.require_binary("qemu-img", "qemu-utils"), "rebase", "-u", "-F", "qcow2",
             "-b", str(backing), str(overlay)], what="qemu-img rebase")


def _committed(m: VmManager, token: str) -> Snapshot | None:
    for snap in all_snapshots(m):
        if snap.meta.get("token") == token:
            return snap
    return None
