"""``/v1/snapshots`` and clones: memory snapshots of running VMs (vmforge.node.snapshots), new
VMs restored from them and clones of running VMs (vmforge.node.restore), as the CLI's
``vmforge snapshot ...``, ``vmforge run --from-snapshot`` and ``vmforge clone`` do.

Taking a snapshot and restoring one are long operations that block on the hypervisor (a
migration to a file, ``-incoming``): they run in worker threads, never on the event loop. As
the daemon's other long operations (``POST /v1/vms``, image pulls and builds), they answer at
once by default, with the job doing the work (202, ``Location: /v1/jobs/ID``) whose progress
is readable and whose ``result`` is the answer; with ``wait=true`` the answer is the result
itself. Either way every progress event goes to ``/v1/events``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ImageError
from ..events import Progress
from ..spec import NAME_RE
from .app import Daemon, daemon_of
from .errors import ApiError, status_for
from .images import REF_PATTERN
from .models import JobOut, VmOut
from .vms import VmName, vm_out

if TYPE_CHECKING:
    from ..node.manager import VmManager
    from ..node.snapshots import Snapshot

__all__ = ["router", "snapshot_out", "run_long", "get_snapshot_for", "SnapshotOut", "SnapRef"]

router = APIRouter(tags=["snapshots"])

SnapRef = Annotated[str, Path(pattern=REF_PATTERN, max_length=80,
                              description="The snapshot: NAME or NAME:VERSION")]
Wait = Annotated[bool, Query(description="Answer at once with the job doing it (false: "
                                         "202, follow /v1/jobs/ID), or when done (true)")]
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$"  # a library name (no version)


class SnapshotOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: int
    ref: str
    id: int
    source_vm: str | None = None
    created_at: float
    size: int
    parent: str | None = Field(None, description="The image or snapshot it builds on")
    lineage: list[str] = Field(default_factory=list)
    backend: str | None = None
    hypervisor_version: str | None = None
    machine_type: str | None = None
    accel: str | None = None
    memory_mib: int | None = None
    cpu_cores: int | None = None
    disks: list[str]
    files: dict[str, dict[str, Any]]
    paused_seconds: float | None = None
    users: list[str] = Field(description="VMs that need it (clones, and VMs whose disks "
                                          "build on its layers)")
    spec: dict[str, Any]


class SnapshotIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Snapshot name "
                             "(default VM-snap; each snapshot of a name is a new version)")
    stop: bool = Field(False, description="Leave the VM stopped afterwards")
    timeout: float = Field(120.0, gt=0, le=3600, description="Seconds for saving the state")


class RestoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern, max_length=63, description="The new VM")
    timeout: float = Field(120.0, gt=0, le=3600, description="Seconds to wait for it")


class CloneIn(RestoreIn):
    snapshot_name: str | None = Field(None, pattern=NAME_PATTERN, description="Name of the "
                                      "snapshot the clone comes from (default VM-clone)")


class CloneOut(VmOut):
    snapshot: str = Field(description="The snapshot the clone was restored from")


class RemovedSnapshotOut(BaseModel):
    ref: str
    removed: bool


def snapshot_out(m: VmManager, snap: Snapshot, *, show_secrets: bool = False
                 ) -> dict[str, Any]:
    """What ``vmforge snapshot inspect --json`` prints for it (vmforge.cli.snapshots)."""
    from ..node import snapshots
    lib = m.library
    parent = lib.get(snap.image.parent_id).ref if snap.image.parent_id else None
    d = snap.as_dict(users=snapshots.users(m, snap), parent=parent, show_secrets=show_secrets)
    d["lineage"] = lib.lineage(snap.image)
    return d


async def run_long(d: Daemon, kind: str, target: str | None,
                   work: Callable[[Progress], dict[str, Any]], *, wait: bool,
                   status: int = 200, location: Callable[[dict[str, Any]], str] | None = None
                   ) -> JSONResponse:
    """``work(progress)`` in a worker thread: answered when done (``wait``), or at once as a
    job (202) whose result is the same body."""
    if not wait:
        job = d.jobs.run_sync(kind, target, lambda report: work(d.progress(report)))
        return JSONResponse(job.as_dict(), status_code=202,
                            headers={"Location": f"/v1/jobs/{job.id}"})
    body = await asyncio.to_thread(work, d.progress())
    headers = {"Location": location(body)} if location is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def _arun(coro: Any) -> Any:
    """A manager coroutine that blocks on the hypervisor, run to completion in the calling
    (worker) thread with an event loop of its own."""
    return asyncio.run(coro)


_JOB: dict[int | str, dict[str, Any]] = {
    202: {"model": JobOut, "description": "wait=false: the job doing it"}}


# ---------------------------------------------------------------------------- snapshots

@router.post("/vms/{name}/snapshots", response_model=SnapshotOut, status_code=201,
             responses=_JOB, summary="Take a snapshot of a running VM",
             description="Pauses the VM, saves its memory and device state, freezes its "
                         "disks as read-only layers in the library (the VM continues on new "
                         "overlays over them) and resumes it, or leaves it stopped with "
                         "`stop`. The snapshot is a library object (content-addressed, "
                         "checksummed, listed with its parent image).")
async def create_snapshot(request: Request, name: VmName,
                          body: Annotated[SnapshotIn | None, Body()] = None,
                          wait: Wait = False) -> JSONResponse:
    d = daemon_of(request)
    body = body or SnapshotIn(name=None, stop=False, timeout=120.0)
    from ..node import snapshots
    await asyncio.to_thread(d.manager.get, name)  # 404 now rather than in a job
    if body.stop:
        await d.agents.drop(name)

    def work(progress: Progress) -> dict[str, Any]:
        snap = snapshots.create(d.manager, name, body.name, stop=body.stop,
                                progress=progress, timeout=body.timeout)
        return snapshot_out(d.manager, snap)
    res = await run_long(d, "vm.snapshot", name, work, wait=wait, status=201,
                         location=lambda b: f"/v1/snapshots/{b['ref']}")
    d.supervisor.poke()
    return res


@router.get("/snapshots", response_model=list[SnapshotOut], summary="List snapshots")
async def list_snapshots(request: Request) -> list[dict[str, Any]]:
    d = daemon_of(request)
    from ..node import snapshots

    def rows() -> list[dict[str, Any]]:
        return [snapshot_out(d.manager, s) for s in snapshots.all_snapshots(d.manager)]
    return await asyncio.to_thread(rows)


def get_snapshot_for(m: VmManager, ref: str, field: str = "ref") -> Snapshot:
    """The snapshot, or the library's own error naming ``field`` (404: none of that name or
    version)."""
    from ..node import snapshots
    try:
        return snapshots.get(m, ref)
    except ImageError as exc:
        raise ApiError(status_for(exc), exc.message, field=field, hint=exc.hint,
                       kind="ImageError") from exc


@router.get("/snapshots/{ref}", response_model=SnapshotOut, summary="Inspect a snapshot")
async def get_snapshot(request: Request, ref: SnapRef, show_secrets: bool = False
                       ) -> dict[str, Any]:
    d = daemon_of(request)

    def inspect() -> dict[str, Any]:
        return snapshot_out(d.manager, get_snapshot_for(d.manager, ref), show_secrets=show_secrets)
    return await asyncio.to_thread(inspect)


@router.delete("/snapshots/{ref}", response_model=RemovedSnapshotOut,
               summary="Delete a snapshot",
               description="Refused (409) while a VM (a clone, a pool member, the VM whose "
                           "disks build on its layers) or a warm pool uses it.")
async def delete_snapshot(request: Request, ref: SnapRef) -> dict[str, Any]:
    d = daemon_of(request)
    from ..node import snapshots

    def remove() -> dict[str, Any]:
        get_snapshot_for(d.manager, ref)
        return {"ref": snapshots.remove(d.manager, ref).ref, "removed": True}
    return await asyncio.to_thread(remove)


# ---------------------------------------------------------------------------- restore, clone

def _restored(d: Daemon, name: str) -> dict[str, Any]:
    rec = d.manager.get(name, reconcile=False)
    return vm_out(rec)


@router.post("/snapshots/{ref}/restore", response_model=VmOut, status_code=201,
             responses=_JOB, summary="Run a new VM from a snapshot",
             description="As `vmforge run --from-snapshot REF --name NAME`: a new VM whose "
                         "disks are thin overlays on the snapshot's layers and whose memory "
                         "is the saved state, with its own identity (hostname, machine-id, "
                         "random pool, clock); answered once its agent took that identity. "
                         "All or nothing: a restore that fails leaves no VM.")
async def restore_snapshot(request: Request, ref: SnapRef, body: RestoreIn,
                           wait: Wait = False) -> JSONResponse:
    d = daemon_of(request)
    from ..node.restore import restore
    await asyncio.to_thread(get_snapshot_for, d.manager, ref)

    def work(progress: Progress) -> dict[str, Any]:
        _arun(restore(d.manager, ref, body.name, progress=progress, timeout=body.timeout))
        return _restored(d, body.name)
    res = await run_long(d, "vm.restore", body.name, work, wait=wait, status=201,
                         location=lambda b: f"/v1/vms/{b['name']}")
    d.supervisor.poke()
    return res


@router.post("/vms/{name}/clone", response_model=CloneOut, status_code=201, responses=_JOB,
             summary="Clone a running VM",
             description="As `vmforge clone NAME --name NEW`: snapshots the running VM (it "
                         "keeps running; the snapshot, `snapshot_name` or NAME-clone, stays "
                         "in the library while clones use it) and restores that as the new "
                         "VM.")
async def clone_vm(request: Request, name: VmName, body: CloneIn, wait: Wait = False
                   ) -> JSONResponse:
    d = daemon_of(request)
    from ..node.restore import clone
    await asyncio.to_thread(d.manager.get, name)

    def work(progress: Progress) -> dict[str, Any]:
        _rec, snap = _arun(clone(d.manager, name, body.name, snapshot_name=body.snapshot_name,
                                 progress=progress, timeout=body.timeout))
        return {**_restored(d, body.name), "snapshot": snap.ref}
    res = await run_long(d, "vm.clone", body.name, work, wait=wait, status=201,
                         location=lambda b: f"/v1/vms/{b['name']}")
    d.supervisor.poke()
    return res
