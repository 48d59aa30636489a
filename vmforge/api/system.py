"""``/v1/events`` (Server-Sent Events with ids and ``Last-Event-ID`` resume) and ``/v1/host``
(the doctor's facts, the backends and their capabilities, what the supervisor watches)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from ..spec import NAME_RE
from .app import daemon_of
from .errors import ApiError
from .events import BusEvent, sse_format
from .models import ERRORS_JSON, HostOut

__all__ = ["router", "SseResponse"]

router = APIRouter()


EVENT_SCHEMA: dict[str, Any] = {
    "type": "object", "description": "The JSON in each event's data: line",
    "required": ["id", "kind", "phase", "message", "t"],
    "properties": {"id": {"type": "integer"}, "kind": {"type": "string"},
                   "phase": {"type": "string"}, "message": {"type": "string"},
                   "t": {"type": "number"}, "vm": {"type": "string"},
                   "job": {"type": "string"}, "state": {"type": "string"},
                   "data": {"type": "object"}}}


# One server-sent message: `id:`, `event:` (the kind) and `data:` (the JSON above).
MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["data"],
    "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"},
                   "event": {"type": "string", "enum": ["vm", "job", "daemon"]},
                   "data": {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": EVENT_SCHEMA}}}


class SseResponse(StreamingResponse):
    media_type = "text/event-stream"


@router.get("/events", response_class=SseResponse, tags=["events"],
            summary="Every state change and progress event (Server-Sent Events)",
            description="Each event has an `id`; reconnect with `Last-Event-ID` (header or "
                        "query) to get what was missed (a `gap` event says when some are no "
                        "longer kept). `event:` is the kind (`vm`, `job`, `daemon`); `data:` "
                        "a JSON object with `phase`, `message`, `vm`, `job`, `state`. "
                        "Without an id, `replay=true` sends every kept event first.",
            responses={**ERRORS_JSON, 200: {"content": {"text/event-stream": {
                "schema": MESSAGE_SCHEMA}}}})
async def events(
        request: Request,
        vm: Annotated[str | None, Query(pattern=NAME_RE.pattern, max_length=63,
                                        description="Only this VM's events")] = None,
        kind: Annotated[str | None, Query(pattern=r"^(vm|job|daemon)$")] = None,
        replay: bool = False, follow: bool = True,
        limit: Annotated[float | None, Query(gt=0, le=86400,
                                             description="End the stream after this many "
                                                         "seconds")] = None,
        last_event_id: Annotated[str | None, Query(max_length=20, pattern=r"^\d+$")] = None,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID",
                                                           max_length=40)] = None,
) -> SseResponse:
    d = daemon_of(request)
    raw = last_event_id or last_event_id_header
    last: int | None = None
    if raw:
        try:
            last = int(raw)
        except ValueError:
            raise ApiError(422, f"Last-Event-ID {raw[:40]!r} is not an event id",
                           field="Last-Event-ID", kind="SpecError") from None
    limit = d.limit(limit)

    def wanted(ev: BusEvent) -> bool:
        if ev.kind == "daemon":
            return kind in (None, "daemon")
        if vm is not None and ev.vm != vm:
            return False
        return kind is None or ev.kind == kind

    async def body() -> AsyncIterator[bytes]:
        async for ev in d.bus.stream(last, replay=replay, follow=follow, limit=limit):
            if ev is None:
                yield b": keep-alive\n\n"
            elif wanted(ev):
                yield sse_format(ev)
    return SseResponse(body(), headers={"Cache-Control": "no-cache",
                                        "X-Accel-Buffering": "no"})


@router.get("/host", response_model=HostOut, tags=["host"],
            summary="The host: doctor checks, backends and their capabilities")
async def host(request: Request) -> dict[str, Any]:
    d = daemon_of(request)
    from ..cli.doctor import run_doctor
    from ..hypervisors import available_backends, get_driver
    from .app import _version

    def facts() -> dict[str, Any]:
        try:
            checks = run_doctor(d.manager)
        except Exception as exc:  # noqa: BLE001 - a failing probe is a finding
            checks = [{"name": "doctor", "status": "missing", "detail": str(exc)[:500],
                       "fix": "", "required": False}]
        backends: list[dict[str, Any]] = []
        for b in available_backends():
            entry: dict[str, Any] = {"backend": b.value}
            try:
                drv = get_driver(b)
                st = drv.probe()
                entry.update(available=st.available, detail=st.detail, hint=st.hint,
                             capabilities=drv.capabilities().to_json())
            except Exception as exc:  # noqa: BLE001 - e.g. libvirt-python missing
                entry.update(available=False, detail=f"driver unavailable: {exc}"[:500],
                             hint=None, capabilities=None)
            backends.append(entry)
        return {"checks": json.loads(json.dumps(checks, default=str)), "backends": backends}
    out = await asyncio.to_thread(facts)
    return {"version": _version(), "data_dir": str(d.manager.data.root), **out,
            "supervised": d.supervisor.watching(), "adopted": d.supervisor.adopted}
