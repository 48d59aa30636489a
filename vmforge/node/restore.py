"""Restores: a new VM from a snapshot's saved state (``vmforge run --from-snapshot``, ``vmforge
clone``, warm pool members), and the identity refresh every restored or renamed VM gets.

A restore is all or nothing. Everything that can be checked is checked before anything is
made: the snapshot's files are intact (size and mtime as stored: a truncated state file is
refused here), every image it builds on is still in the library, the hypervisor is the version
that wrote the state and the state file's header names the snapshot's machine type. Then,
under the new VM's lock, its row goes ``creating`` -> ``restoring`` (its directory: a thin
overlay per disk over the snapshot's layer, a seed of its own, the UEFI variables), the
hypervisor starts with exactly the saved VM's devices and loads the state (QEMU:
``-incoming`` and ``-S``; libvirt: ``virDomainRestoreFlags`` of a copy of its save image that
names the new domain, see ``hypervisors/libvirt/snapshot.py``), the guest runs again
(``cont``) and its agent makes it a new VM
(the ``identity`` call). Only then is the row ``running``. Any failure on the way removes the
VM, its process and its directory; a vmforge that dies on the way leaves ``restoring`` with a
free lock, and the next command that reads it removes the VM the same way.

What the identity refresh changes, and what it cannot, is in ``docs/snapshots.md``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..enums import SPEC_REV
from ..errors import (
    AgentError,
    ImageError,
    SpecError,
    VmError,
    VmExists,
    VmforgeError,
)
from ..events import Event, Progress, no_progress
from ..failpoints import hit
from ..hypervisors.base import SavesState
from ..images import qcow2
from ..images.library import LAYER_ROLE, SNAPSHOT_KIND
from ..paths import VmPaths
from . import snapshots as snapmod
from .states import TRANSIENT, VmState

if TYPE_CHECKING:
    from ..hypervisors.base import Driver
    from ..spec import VmRequest
    from .manager import VmManager, VmRecord

__all__ = ["restore", "clone", "discard", "refresh_identity", "check_restorable"]


def check_restorable(m: VmManager, snap: snapmod.Snapshot, name: str
                     ) -> tuple[VmRequest, Driver, SavesState]:
    """Everything a restore of ``snap`` as VM ``name`` needs, checked before anything is
    made; errors say which part of the snapshot is wrong."""
    from ..spec import parse_request, validate_name
    validate_name(name)
    meta = snap.meta
    ref = snap.ref
    if meta.get("format") != snapmod.FORMAT or not isinstance(meta.get("spec"), dict):
        raise ImageError(f"snapshot {ref} was written by another version of vmforge "
                         f"(format {meta.get('format')!r}, this one reads {snapmod.FORMAT})")
    if snap.state is None:
        raise ImageError(f"snapshot {ref} has no saved state")
    req = parse_request({"name": name, "spec": meta["spec"]}, f"snapshot {ref}")
    drv = m.driver(req.spec.hypervisor)
    state = snapmod.saver(drv)
    damaged = (f"the snapshot is damaged: `vmforge image verify {ref}` re-hashes it (and "
               f"accepts it again if it is intact); otherwise `vmforge snapshot rm {ref}` "
               "and take it again")
    try:  # size and mtime of every stored file, as recorded: catches truncation
        m.library.check_intact(snap.image)
    except ImageError as exc:
        raise ImageError(f"snapshot {ref} cannot be restored: {exc.message}",
                         hint=damaged) from exc
    for d in req.spec.disks:
        if snap.layer(d.id) is None:
            raise ImageError(f"snapshot {ref} has no layer for disk {d.id}")
    for role, image_id in (meta.get("pins") or {}).items():
        try:
            img = m.library.get(int(image_id))
        except ImageError:
            raise ImageError(f"snapshot {ref} builds on image #{image_id} ({role}), which "
                             "is no longer in the library",
                             hint="a layer's base is missing; the snapshot cannot be "
                                  "restored") from None
        try:  # of an earlier snapshot, only its layers
            m.library.check_intact(img, None if img.kind != SNAPSHOT_KIND else
                                   lambda r: r.startswith(LAYER_ROLE))
        except ImageError as exc:
            raise ImageError(f"snapshot {ref} builds on {img.ref} ({role}): {exc.message}",
                             hint=exc.hint) from exc
    for path, (size, mtime) in (meta.get("backing_files") or {}).items():
        try:
            st = os.stat(path)
        except OSError:
            raise ImageError(f"snapshot {ref} builds on {path}, which is gone") from None
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            raise ImageError(f"snapshot {ref} builds on {path}, which changed since the "
                             "snapshot was taken", hint="its layers are only valid on the "
                             "backing file as it was")
    host = m.host()
    if meta.get("hypervisor_version") != host.qemu_version:
        raise ImageError(f"snapshot {ref} was saved by {req.spec.hypervisor.value} "
                         f"{meta.get('hypervisor_version')}; this host runs "
                         f"{host.qemu_version}",
                         hint="a saved state loads only into the version that wrote it; "
                              "boot the VM cold instead (`vmforge run -f SPEC`)")
    try:
        info = state.state_info(snap.state)
    except VmError as exc:
        raise ImageError(f"snapshot {ref}: {exc.message}") from exc
    if meta.get("machine_type") and info.get("machine") != meta.get("machine_type"):
        raise ImageError(f"snapshot {ref}: its state file is for machine type "
                         f"{info.get('machine')}, the snapshot for "
                         f"{meta.get('machine_type')}")
    accel, _why = m.accel_for(req, host)
    if meta.get("accel") and accel.value != meta["accel"]:
        raise SpecError(f"snapshot {ref} was saved under {meta['accel']}, and this host "
                        f"would run it under {accel.value}", field="spec.accel",
                        hint="a saved state loads only under the accelerator that wrote it")
    for i, n in enumerate(req.spec.nics):
        if n.mac and (n.network or n.bridge):
            raise SpecError(f"a clone cannot have VM {meta.get('source_vm')}'s MAC {n.mac} "
                            "on a host network", field=f"spec.nics[{i}].mac",
                            hint="leave mac unset: vmforge derives one from the VM's name")
    return req, drv, state


async def restore(m: VmManager, ref: str, name: str, *, progress: Progress = no_progress,
                  timeout: float = 120.0) -> VmRecord:
    """A new VM ``name`` from snapshot ``ref``: its disks thin overlays on the snapshot's
    layers, its memory the saved state, its identity its own. Returns it ready."""
    snap = snapmod.get(m, ref)
    req, drv, state = check_restorable(m, snap, name)
    lock = m._lock(name)
    await lock.acquire_async()
    made = False
    try:
        stale = m._row(name)
        if stale is not None and stale.state in TRANSIENT:
            m._recover(name)
        try:
            rec = _create(m, snap, req, drv, progress)
            made = True
            t0 = time.time()
            rec = _start(m, snap, rec, drv, state, progress, timeout)
            progress(Event(name, "restore", "refreshing the guest's identity"))
            report = await refresh_identity(m, rec, old_nics=snap.meta.get("nics") or [],
                                            timeout=timeout)
            hit("restore.identity")
            m._set(name, state=VmState.RUNNING.value, ready_at=time.time(),
                   last_error=_identity_problems(report))
            progress(Event(name, "ready", f"restored in {time.time() - t0:.2f}s"))
        except BaseException as exc:
            if made:
                row = m._row(name)
                if row is not None:
                    discard(m, row)
            if isinstance(exc, VmExists) or not made or not isinstance(exc, VmforgeError):
                raise
            raise VmError(f"cannot restore snapshot {snap.ref} as VM {name}: {exc.message}"
                          f" (VM {name} was removed again)", hint=exc.hint) from exc
    finally:
        lock.release(unlink=m._row(name) is None)
    return m.get(name, reconcile=False)


def _identity_problems(report: dict[str, Any]) -> str | None:
    failed = report.get("failed") or {}
    skipped = report.get("skipped")
    if skipped:
        return f"identity not refreshed: {skipped}"
    if failed:
        return "identity partly refreshed: " + "; ".join(f"{k}: {v}" for k, v in
                                                          sorted(failed.items()))[:1500]
    return None


def _create(m: VmManager, snap: snapmod.Snapshot, req: VmRequest, drv: Driver,
            progress: Progress) -> VmRecord:
    """The clone's row (``creating``, then ``restoring``) and directory; the caller holds
    its lock. Mirrors ``VmManager.create``: a crash leaves what ``_recover`` removes."""
    from . import plan as planmod
    name = req.name
    nets = m._nets(req)
    resolved = planmod.resolve_nics(req, nets)
    final = m.data.vms / name
    pins = {role: int(i) for role, i in (snap.meta.get("pins") or {}).items()}
    pins[f"{snapmod.PIN_PREFIX}{snap.image.id}"] = snap.image.id
    try:
        with m.db.tx() as c:
            c.execute("INSERT INTO vms (name, state, spec, spec_rev, dir, created_at, "
                      "owner_pid, backend) VALUES (?, 'creating', ?, ?, ?, ?, ?, ?)",
                      (name, req.model_dump_json(by_alias=True), SPEC_REV, str(final),
                       time.time(), os.getpid(), drv.backend.value))
            for role, image_id in pins.items():
                c.execute("INSERT INTO vm_images (vm_name, role, image_id) VALUES (?,?,?)",
                          (name, role, image_id))
            if nets:
                from ..net.store import NetworkStore
                NetworkStore.record_vm_nics(c, name, resolved)
    except sqlite3.IntegrityError:
        raise VmExists(f"a VM named {name!r} already exists",
                       hint="pick another --name or `vmforge rm` it first") from None
    hit("restore.row")
    tmp = m.data.vms / f".{name}.creating-{os.getpid()}"
    try:
        if final.exists():
            raise VmError(f"{final} exists but no VM of that name is recorded",
                          hint="move that directory away; vmforge will not overwrite it")
        tmp.mkdir(mode=0o700)
        progress(Event(name, "create", f"thin overlays on snapshot {snap.ref}"))
        _artifacts(m, snap, req, VmPaths(tmp), nets, pins)
        fd = os.open(tmp / "spec.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(req.model_dump_json(by_alias=True, indent=2))
        os.rename(tmp, final)
        m._set(name, state=VmState.RESTORING.value)
        hit("restore.created")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        with m.db.tx() as c:
            c.execute("DELETE FROM vm_images WHERE vm_name=?", (name,))
            c.execute("DELETE FROM vm_nics WHERE vm_name=?", (name,))
            c.execute("DELETE FROM vms WHERE name=?", (name,))
        raise
    progress(Event(name, "state", VmState.RESTORING.value))
    rec = m._row(name)
    assert rec is not None
    return rec


def _artifacts(m: VmManager, snap: snapmod.Snapshot, req: VmRequest, paths: VmPaths,
               nets: Any, pins: dict[str, int]) -> None:
    from ..agent import guest
    from ..seed import build_seed, find_ssh_public_key, inject_agent, write_iso
    from . import plan as planmod
    spec = req.spec
    for d in spec.disks:
        layer = snap.layer(d.id)
        assert layer is not None  # checked
        qcow2.create_overlay(layer, paths.disk(d.id), None, backing_format="qcow2")
    if planmod.needs_seed(req):  # its own: a cold boot later is a new instance to cloud-init
        inputs = planmod.pinned_inputs(req, m.library, pins)
        seed = build_seed(req.name, spec.cloud_init, default_if_empty=True,
                          ssh_key=find_ssh_public_key(), schema=False,
                          network_config=planmod.guest_network_config(
                              planmod.resolve_nics(req, nets)))
        if spec.agent.enabled and spec.agent.inject and not inputs.agent_baked_in:
            seed = inject_agent(seed, Path(guest.__file__).read_bytes())
        write_iso(seed, paths.seed)
    nvram = snap.image.path("nvram")
    if nvram is not None:
        shutil.copyfile(nvram, paths.uefi_vars)
    for p in paths.dir.iterdir():
        p.chmod(0o600)


def _start(m: VmManager, snap: snapmod.Snapshot, rec: VmRecord, drv: Driver,
           state: SavesState, progress: Progress, timeout: float) -> VmRecord:
    """Start the hypervisor on the saved state and run the guest; the row stays
    ``restoring`` (the identity is not its own yet)."""
    from . import plan as planmod
    name = rec.name
    req = rec.req
    host = m.host()
    inputs = planmod.pinned_inputs(req, m.library, m._pins(name))
    accel, _why = m.accel_for(req, host)
    nets = m._nets(req)
    mp = planmod.machine_plan(req, inputs, rec.paths, host, accel, nets)
    assert snap.state is not None
    mp = replace(mp, incoming=state.incoming(snap.state), vmgenid=str(uuid.uuid4()))
    started = time.time()

    def record(rt: Any) -> None:
        m._set(name, runtime=rt.to_json())
    m._attach_net(name, mp, nets, progress)
    progress(Event(name, "restore", "loading the saved state"))
    rt = drv.start(mp, host, record)
    hit("restore.launched")
    loaded = state.wait_restored(rt, rec.dir, timeout)
    state.resume(rt)
    hit("restore.resumed")
    progress(Event(name, "restore", f"state loaded in {loaded:.2f}s; guest running"))
    m._set(name, runtime=rt.to_json(), started_at=started, ready_at=None, stopped_at=None)
    out = m._row(name)
    assert out is not None
    return out


def discard(m: VmManager, rec: VmRecord) -> None:
    """Remove a VM whose restore failed or was interrupted: its process, taps, directory and
    rows (through ``deleting``, so a crash here is finished by the next command)."""
    m._set(rec.name, state=VmState.DELETING.value)
    row = m._row(rec.name) or rec
    m._finish_delete(row)


async def clone(m: VmManager, vm: str, name: str, *, snapshot_name: str | None = None,
                progress: Progress = no_progress, timeout: float = 120.0
                ) -> tuple[VmRecord, snapmod.Snapshot]:
    """Snapshot the running VM ``vm`` (``snapshot_name``, default ``VM-clone``; it keeps
    running) and restore that as the new VM ``name``."""
    import asyncio

    from ..spec import validate_name
    validate_name(name)
    if m._row(name) is not None:
        raise VmExists(f"a VM named {name!r} already exists",
                       hint="pick another --name or `vmforge rm` it first")
    snap = await asyncio.to_thread(snapmod.create, m, vm, snapshot_name or f"{vm}-clone",
                                   progress=progress, timeout=timeout)
    rec = await restore(m, snap.ref, name, progress=progress, timeout=timeout)
    return rec, snap


# ---------------------------------------------------------------------------- identity

def identity_args(name: str, nics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The agent's ``identity`` call: a new name and hostname, machine-id, entropy for the
    kernel's pool, the host's clock, and each host NIC's new MAC (DHCP renews)."""
    args: dict[str, Any] = {"name": name, "hostname": name, "machine_id": uuid.uuid4().hex,
                            "entropy": base64.b64encode(os.urandom(64)).decode(),
                            "time_ns": time.time_ns()}
    if nics:
        args["nics"] = nics
    return args


def _nic_changes(m: VmManager, rec: VmRecord, old_nics: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    from . import plan as planmod
    old = {str(n.get("id")): n for n in old_nics if isinstance(n, dict)}
    out = []
    for n in planmod.resolve_nics(rec.req, m._nets(rec.req)):
        before = old.get(n.id)
        if not n.mode.on_host or before is None or not before.get("mac") or not n.mac:
            continue
        if str(before["mac"]).lower() != n.mac.lower():
            out.append({"old_mac": before["mac"], "mac": n.mac, "dhcp": n.dhcp})
    return out


async def refresh_identity(m: VmManager, rec: VmRecord, *,
                           old_nics: list[dict[str, Any]] | None = None,
                           timeout: float = 30.0) -> dict[str, Any]:
    """Tell the guest agent it is VM ``rec.name`` now (after a restore or a rename); the
    agent's report of what it refreshed (``refreshed``, ``failed``), or ``skipped``."""
    import asyncio

    from ..agent.client import AgentClient
    if not rec.req.spec.agent.enabled:
        return {"skipped": "the VM has no agent"}
    nics = _nic_changes(m, rec, old_nics or [])
    client = AgentClient(rec.agent_endpoint, queue_timeout=timeout)
    try:
        await client.connect(timeout=timeout)
        hello = await client.wait_ready(timeout)
        if "identity" not in (hello.get("features") or []):
            return {"skipped": f"the guest's agent {hello.get('agent_version')} has no "
                               "identity call (older than this vmforge)"}
        report = await asyncio.wait_for(
            client.call("identity", identity_args(rec.name, nics), timeout=timeout),
            timeout)
    except (AgentError, OSError, TimeoutError) as exc:
        raise VmError(f"VM {rec.name}: the guest agent did not take its new identity: "
                      f"{exc}") from exc
    finally:
        await client.close()
    return dict(report) if isinstance(report, dict) else {"report": json.dumps(report)}
