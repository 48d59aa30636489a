"""``/v1/vms/{name}/...`` guest operations through the agent: exec (NDJSON over chunked HTTP,
or a WebSocket), files (streamed, sha256-checked both ends) and health."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ..agent.client import AgentClient, ExecResult
from ..errors import AgentError, RemoteError, SpecError, VmforgeError
from .app import Daemon, check_token, daemon_of, dumps
from .errors import ApiError, error_body, status_for
from .models import ERRORS_JSON, ExecIn, ExecOut, FileOut
from .vms import VmName

__all__ = ["router", "ws_router", "NdjsonResponse", "OctetStream"]

router = APIRouter(tags=["guest"])
ws_router = APIRouter(tags=["guest"])

GuestPath = Annotated[str, Query(pattern=r"^/", max_length=4096,
                                 description="Absolute path in the guest")]


class NdjsonResponse(StreamingResponse):
    media_type = "application/x-ndjson"


class OctetStream(StreamingResponse):
    media_type = "application/octet-stream"


def _stdin(body: ExecIn) -> bytes | None:
    if body.stdin is not None and body.stdin_b64 is not None:
        raise SpecError("give stdin or stdin_b64, not both", field="stdin")
    if body.stdin_b64 is not None:
        try:
            return base64.b64decode(body.stdin_b64, validate=True)
        except (binascii.Error, ValueError):
            raise SpecError("not valid base64", field="stdin_b64") from None
    return body.stdin.encode() if body.stdin is not None else None


def _final(res: ExecResult) -> dict[str, Any]:
    return {"exit_code": res.exit_code, "signal": res.signal, "timed_out": res.timed_out,
            "duration": round(res.duration, 6)}


def _failed(exc: BaseException) -> dict[str, Any]:
    """The last line when the command could not run or the connection broke."""
    line: dict[str, Any] = {"exit_code": None, "signal": None, "timed_out": False}
    if isinstance(exc, RemoteError) and exc.kind in ("FileNotFoundError", "PermissionError"):
        line["exit_code"] = 127 if exc.kind == "FileNotFoundError" else 126
    line.update(error=error_body(exc))
    return line


async def _run_exec(d: Daemon, name: str, body: ExecIn, stdin: bytes | None,
                    out: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Run the command, putting output lines and then the final line on ``out``."""
    try:
        async with d.agents.session(name) as client:
            async def on_output(stream: str, data: bytes) -> None:
                await out.put({"stream": stream, "data": base64.b64encode(data).decode()})
            res = await client.exec(body.argv, shell=body.shell, env=body.env, cwd=body.cwd,
                                    stdin=stdin, timeout=body.timeout, on_output=on_output)
        await out.put(_final(res))
    except VmforgeError as exc:
        await out.put(_failed(exc))
    finally:
        await out.put(None)


@router.post("/vms/{name}/exec", summary="Run a command in the guest",
             response_class=NdjsonResponse,
             responses={**ERRORS_JSON, 200: {
                              "description": "NDJSON: `{\"stream\": \"stdout\"|\"stderr\", "
                              "\"data\": BASE64}` lines as output comes, then one "
                              "`{\"exit_code\": N, \"signal\": S, \"timed_out\": B}` line "
                              "(with `error` when the command could not run). With "
                              "`stream=false`: one JSON object (ExecOut).",
                              "content": {"application/x-ndjson": {"schema": {
                                  "type": "string"}},
                                  "application/json": {"schema": {
                                      "$ref": "#/components/schemas/ExecOut"}}}}})
async def exec_cmd(request: Request, name: VmName, body: ExecIn, stream: bool = True
                   ) -> Any:
    d = daemon_of(request)
    stdin = _stdin(body)
    if not stream:
        async with d.agents.session(name) as client:
            res = await client.exec(body.argv, shell=body.shell, env=body.env, cwd=body.cwd,
                                    stdin=stdin, timeout=body.timeout)
        from fastapi.responses import JSONResponse
        return JSONResponse(ExecOut(**_final(res), stdout=base64.b64encode(res.stdout).decode(),
                                    stderr=base64.b64encode(res.stderr).decode()).model_dump())
    # Errors before the command runs (no VM, not running, agent unreachable) are HTTP errors:
    # open the session first; the stream then only carries output and the final line.
    async with d.agents.session(name):
        pass
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=256)
    task = asyncio.create_task(_run_exec(d, name, body, stdin, out))
    d.background.add(task)
    task.add_done_callback(d.background.discard)

    async def lines() -> AsyncIterator[bytes]:
        try:
            while (item := await out.get()) is not None:
                yield dumps(item)
        finally:
            if not task.done():
                task.cancel()
    return NdjsonResponse(lines())


@ws_router.websocket("/vms/{name}/exec/ws")
async def exec_ws(websocket: WebSocket, name: str) -> None:
    """Exec over a WebSocket: the first text message is the ExecIn JSON; then JSON text
    messages as the HTTP stream's lines, the last with the exit code. Closing the socket
    abandons the command (the agent protocol has no stdin streaming: stdin goes whole in
    the first message)."""
    d = daemon_of(websocket)
    auth = websocket.headers.get("authorization", "")
    try:
        check_token(websocket, auth[7:] if auth.lower().startswith("bearer ") else None)
    except ApiError:
        await websocket.close(code=1008, reason="missing or wrong bearer token")
        return
    await websocket.accept()
    try:
        from ..spec import NAME_RE
        if not NAME_RE.fullmatch(name):
            raise SpecError(f"invalid VM name {name!r}", field="name")
        try:
            body = ExecIn.model_validate_json(await websocket.receive_text())
        except ValueError as exc:
            raise SpecError(f"bad exec request: {exc}", field="body") from None
        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=256)
        task = asyncio.create_task(_run_exec(d, name, body, _stdin(body), out))
        try:
            while (item := await out.get()) is not None:
                await websocket.send_text(dumps(item).decode().rstrip("\n"))
        finally:
            if not task.done():
                task.cancel()
        await websocket.close()
    except WebSocketDisconnect:
        return
    except VmforgeError as exc:
        with contextlib.suppress(Exception):
            await websocket.send_text(dumps(_failed(exc)).decode().rstrip("\n"))
            await websocket.close(code=1011 if status_for(exc) >= 500 else 1008)


def _spool_dir(d: Daemon) -> FsPath:
    p = d.manager.data.root / "tmp"
    p.mkdir(mode=0o700, exist_ok=True)
    return p


@router.put("/vms/{name}/files", response_model=FileOut, summary="Upload a file",
            description="The body is the file's bytes. Give `X-Content-SHA256` to have them "
                        "checked before anything reaches the guest; the guest checks the "
                        "sha256 again before the file takes its place.",
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}})
async def put_file(request: Request, name: VmName, path: GuestPath,
                   mode: Annotated[str | None, Query(pattern=r"^0?[0-7]{3,4}$",
                                                     description="Octal, e.g. 0644")] = None
                   ) -> dict[str, Any]:
    d = daemon_of(request)
    await asyncio.to_thread(d.manager.get, name)  # 404 before reading a large body
    expected = request.headers.get("x-content-sha256")
    fd, tmp = tempfile.mkstemp(prefix="upload-", dir=_spool_dir(d))
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
        digest = h.hexdigest()
        if expected and expected.lower() != digest:
            raise ApiError(422, f"checksum mismatch: the body's sha256 is {digest}, "
                           f"X-Content-SHA256 says {expected}", field="X-Content-SHA256",
                           kind="ChecksumError")
        async with d.agents.session(name) as client:
            res = await client.put_file(tmp, path, mode=int(mode, 8) if mode else 0o644)
        if res.get("sha256") != digest:
            raise AgentError(f"checksum mismatch in the guest: {res.get('sha256')}")
        return {"path": str(res.get("path", path)), "size": size, "sha256": digest}
    finally:
        FsPath(tmp).unlink(missing_ok=True)


@router.get("/vms/{name}/files", response_class=OctetStream, summary="Download a file",
            responses={**ERRORS_JSON, 200: {
                             "description": "The file's bytes; `X-Content-SHA256` carries "
                             "their sha256 (checked against the guest's on the way)",
                             "content": {"application/octet-stream": {"schema": {
                                 "type": "string", "format": "binary"}}}}})
async def get_file(request: Request, name: VmName, path: GuestPath) -> OctetStream:
    d = daemon_of(request)
    fd, tmp = tempfile.mkstemp(prefix="download-", dir=_spool_dir(d))
    os.close(fd)
    try:
        async with d.agents.session(name) as client:
            res = await client.get_file(path, tmp)  # sha256-checked against the guest's
    except BaseException:
        FsPath(tmp).unlink(missing_ok=True)
        raise
    size = os.path.getsize(tmp)

    async def body() -> AsyncIterator[bytes]:
        with open(tmp, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                yield chunk
    return OctetStream(body(), headers={"X-Content-SHA256": str(res["sha256"]),
                                        "Content-Length": str(size),
                                        "X-File-Mode": oct(int(res.get("mode", 0o644)))},
                       background=BackgroundTask(FsPath(tmp).unlink, missing_ok=True))


@router.get("/vms/{name}/health", response_model=dict[str, Any], summary="Guest health",
            description="Agent, load, memory, disk, cloud-init and the spec's health checks.")
async def health(request: Request, name: VmName,
                 timeout: Annotated[float, Query(gt=0, le=600)] = 60) -> dict[str, Any]:
    d = daemon_of(request)
    rec = await asyncio.to_thread(d.manager.get, name)
    checks = [c.model_dump(exclude_none=True) for c in rec.req.spec.health_checks]
    async with d.agents.session(name) as client:
        return await _health(client, checks, timeout)


async def _health(client: AgentClient, checks: list[dict[str, Any]], timeout: float
                  ) -> dict[str, Any]:
    return await client.health(checks, timeout=timeout)
