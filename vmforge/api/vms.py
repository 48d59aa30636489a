"""``/v1/vms``: create (the node-daemon request format verbatim), list, inspect, start, stop,
kill, delete, and the serial console."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import VmError, VmforgeError
from ..events import Event
from ..node.manager import VmRecord
from ..node.states import VmState
from ..spec import NAME_RE, VmRequest, resolve_paths
from .app import Daemon, daemon_of
from .models import ERRORS_JSON, DeletedOut, StopOut, VmOut, Wait

__all__ = ["router", "VmName", "vm_out"]

router = APIRouter(tags=["vms"])

VmName = Annotated[str, Path(pattern=NAME_RE.pattern, max_length=63,
                             description="The VM's name")]
Timeout = Annotated[float, Query(gt=0, le=3600, description="Seconds")]


class PlainStream(StreamingResponse):
    media_type = "text/plain; charset=utf-8"


def vm_out(rec: VmRecord, *, show_secrets: bool = False, job: str | None = None
           ) -> dict[str, Any]:
    d = rec.as_dict(show_secrets=show_secrets)
    d["links"] = {"self": f"/v1/vms/{rec.name}", "events": f"/v1/events?vm={rec.name}",
                  "console": f"/v1/vms/{rec.name}/console",
                  "exec": f"/v1/vms/{rec.name}/exec"}
    if job:
        d["job"] = job
        d["links"]["job"] = f"/v1/jobs/{job}"
    return d


async def _get(d: Daemon, name: str) -> VmRecord:
    return await asyncio.to_thread(d.manager.get, name)


async def _bring_up(d: Daemon, name: str, *, ready: bool, timeout: float,
                    report: Any, remove_on_failure: bool) -> VmRecord:
    """Start a created VM, then (``ready``) wait for its agent and run its provision steps."""
    progress = d.progress(report)
    try:
        rec = await asyncio.to_thread(d.manager.start, name, progress)
        d.supervisor.poke()
        if ready:
            rec = await d.manager.wait_ready(name, timeout, progress)
            if rec.req.spec.provision:
                await d.manager.provision(name, d.manager.data.root, progress)
        return rec
    except BaseException as exc:
        if remove_on_failure:
            with contextlib.suppress(VmError):
                await d.agents.drop(name)
                await d.manager.delete(name, force=True, stop_timeout=0)
            progress(Event(name, "state", "deleted", data={"error": str(exc)[:500]}))
        raise


@router.get("/vms", response_model=list[VmOut], summary="List VMs")
async def list_vms(request: Request, show_secrets: bool = False) -> list[dict[str, Any]]:
    d = daemon_of(request)
    recs = await asyncio.to_thread(d.manager.vms)
    return [vm_out(r, show_secrets=show_secrets) for r in recs]


@router.post("/vms", response_model=VmOut, status_code=201, summary="Create a VM",
             description="Takes the node-daemon request format verbatim (`name` + `spec`). "
             "Creates the VM and (unless `start=false`) starts it: with `wait=none` in the "
             "background (follow `links.events` or `links.job`), with `wait=running` until "
             "the hypervisor runs, with `wait=ready` until the guest agent is ready and the "
             "spec's provision steps ran (a VM that fails on the way is removed unless "
             "`keep_on_failure`). Relative file paths are relative to the daemon's data "
             "directory.")
async def create_vm(request: Request, req: VmRequest, start: bool = True,
                    wait: Wait = Wait.NONE, timeout: Timeout = 300,
                    keep_on_failure: bool = False) -> JSONResponse:
    d = daemon_of(request)
    req = resolve_paths(req, d.manager.data.root)
    progress = d.progress()
    await asyncio.to_thread(d.manager.ensure_images, req, progress)
    rec = await asyncio.to_thread(d.manager.create, req, progress)
    job_id = None
    if start and wait is Wait.NONE:
        async def bring_up(report: Any) -> dict[str, Any]:
            r = await _bring_up(d, req.name, ready=True, timeout=timeout, report=report,
                                remove_on_failure=False)
            return {"name": r.name, "state": r.state.value, "boot_seconds": r.boot_seconds}
        job = d.jobs.run_async("vm.start", req.name, bring_up)
        job_id = job.id
    elif start:
        rec = await _bring_up(d, req.name, ready=wait is Wait.READY, timeout=timeout,
                              report=None, remove_on_failure=not keep_on_failure)
    rec = await _get(d, req.name) if job_id else rec
    return JSONResponse(vm_out(rec, job=job_id), status_code=201,
                        headers={"Location": f"/v1/vms/{req.name}"})


@router.get("/vms/{name}", response_model=VmOut, summary="Inspect a VM")
async def get_vm(request: Request, name: VmName, show_secrets: bool = False
                 ) -> dict[str, Any]:
    return vm_out(await _get(daemon_of(request), name), show_secrets=show_secrets)


@router.post("/vms/{name}/start", response_model=VmOut, summary="Start a VM")
async def start_vm(request: Request, name: VmName, wait: Wait = Wait.RUNNING,
                   timeout: Timeout = 300) -> dict[str, Any]:
    d = daemon_of(request)
    if wait is Wait.NONE:
        await _get(d, name)  # 404 now rather than in the job

        async def bring_up(report: Any) -> dict[str, Any]:
            r = await _bring_up(d, name, ready=True, timeout=timeout, report=report,
                                remove_on_failure=False)
            return {"name": r.name, "state": r.state.value}
        job = d.jobs.run_async("vm.start", name, bring_up)
        return vm_out(await _get(d, name), job=job.id)
    rec = await _bring_up(d, name, ready=wait is Wait.READY, timeout=timeout, report=None,
                          remove_on_failure=False)
    return vm_out(rec)


@router.post("/vms/{name}/stop", response_model=StopOut, summary="Stop a VM",
             description="Agent shutdown, else the power button, then quit, then kill, all "
                         "within `timeout` seconds (0: kill at once).")
async def stop_vm(request: Request, name: VmName,
                  timeout: Annotated[float, Query(ge=0, le=3600)] = 30) -> dict[str, Any]:
    d = daemon_of(request)
    await d.agents.drop(name)
    outcome = await d.manager.stop(name, timeout)
    rec = await _get(d, name)
    _published(d, rec)
    return {"name": name, "outcome": outcome.value, "vm": vm_out(rec)}


@router.post("/vms/{name}/kill", response_model=StopOut, summary="Kill a VM at once")
async def kill_vm(request: Request, name: VmName) -> dict[str, Any]:
    d = daemon_of(request)
    await d.agents.drop(name)
    outcome = await asyncio.to_thread(d.manager.kill, name)
    rec = await _get(d, name)
    _published(d, rec)
    return {"name": name, "outcome": outcome.value, "vm": vm_out(rec)}


@router.delete("/vms/{name}", response_model=DeletedOut, summary="Delete a VM",
               description="`force` stops a running VM first (gracefully within "
                           "`stop_timeout` seconds, then by force).")
async def delete_vm(request: Request, name: VmName, force: bool = False,
                    stop_timeout: Annotated[float, Query(ge=0, le=3600)] = 10
                    ) -> dict[str, Any]:
    d = daemon_of(request)
    await d.agents.drop(name)
    await d.manager.delete(name, force=force, stop_timeout=stop_timeout)
    d.supervisor.note_state(name, "deleted")
    d.bus.publish("vm", "state", "deleted", vm=name, state="deleted")
    return {"name": name, "deleted": True}


def _published(d: Daemon, rec: VmRecord) -> None:
    state = rec.state.value
    d.supervisor.note_state(rec.name, state)
    data = {"reason": rec.stop_reason} if rec.stop_reason else {}
    d.bus.publish("vm", "state", state, vm=rec.name, state=state, data=data)


@router.get("/vms/{name}/console", response_class=PlainStream, summary="The serial console",
            responses={**ERRORS_JSON,
                       200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def console(request: Request, name: VmName, follow: bool = False,
                  tail: Annotated[int, Query(ge=0, le=100000,
                                             description="Last N lines (0: all)")] = 0,
                  limit: Annotated[float | None, Query(gt=0, le=86400,
                                   description="Stop following after this many seconds")]
                  = None) -> StreamingResponse:
    d = daemon_of(request)
    rec = await _get(d, name)
    path = rec.paths.console
    limit = d.limit(limit)

    async def body() -> AsyncIterator[bytes]:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in finally
        except OSError:
            return
        try:
            data = f.read()
            if tail:
                data = b"\n".join(data.splitlines()[-tail:]) + b"\n"
            yield data
            if not follow:
                return
            deadline = None if limit is None else time.monotonic() + limit
            quiet = 0
            while deadline is None or time.monotonic() < deadline:
                chunk = f.read()
                if chunk:
                    quiet = 0
                    yield chunk
                    continue
                await asyncio.sleep(0.2)
                quiet += 1
                if quiet % 10 == 0:  # every 2 s: is it still running?
                    try:
                        r = await asyncio.to_thread(d.manager.get, name)
                    except VmforgeError:
                        return
                    if r.state not in (VmState.RUNNING, VmState.STARTING, VmState.STOPPING):
                        yield f.read()
                        return
        finally:
            f.close()
    return PlainStream(body())
