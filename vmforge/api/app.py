"""The node daemon's FastAPI application: ``create_app(manager, token=None)``.

It shares the library's :class:`~vmforge.node.manager.VmManager` (no second implementation):
sync manager calls run in worker threads (``asyncio.to_thread``), coroutines are awaited, so
the event loop never blocks on a boot. Routes live in ``vms``, ``guest``, ``images``,
``system``, ``validate``, ``snapshots`` (snapshots, restores, clones) and ``pools``; errors
are mapped in ``errors``; ``web`` is the console at ``/`` (login form, session cookies,
pages)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import SpecError, VmforgeError
from ..events import Event, Progress
from ..node.manager import VmManager
from .agents import AgentPool
from .errors import ApiError, error_body, status_for
from .events import EventBus
from .jobs import JobManager
from .models import ERRORS
from .supervisor import Supervisor

__all__ = ["create_app", "Daemon", "mark_transport", "TRANSPORT_KEY", "SESSION_KEY"]

log = logging.getLogger("vmforge.api")

TRANSPORT_KEY = "vmforge.transport"
#: Set by the web console's middleware (vmforge.api.web) on a request that carries a valid
#: session cookie (and, when it changes state, the session's CSRF token).
SESSION_KEY = "vmforge.session"
API_VERSION = "1"


@dataclass
class Daemon:
    """What every request handler shares."""
    manager: VmManager
    bus: EventBus
    jobs: JobManager
    agents: AgentPool
    supervisor: Supervisor
    token: str | None = None
    stream_limit: float | None = None  # cap on streaming responses (tests, fuzzing)
    supervise: bool = True
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def progress(self, job_report: Callable[[Event], None] | None = None) -> Progress:
        """A progress callback for manager calls: every event goes to the event stream (and
        to a job's record when given); may be called from worker threads."""
        def report(e: Event) -> None:
            if e.vm is not None and e.phase in ("state", "ready"):
                self.supervisor.note_state(e.vm, "ready" if e.phase == "ready" else e.message)
            if job_report is not None:
                job_report(e)
            else:
                self.bus.publish_event(e)
        return report

    def limit(self, asked: float | None) -> float | None:
        if self.stream_limit is None:
            return asked
        return self.stream_limit if asked is None else min(asked, self.stream_limit)


def daemon_of(conn: HTTPConnection) -> Daemon:
    d: Daemon = conn.app.state.daemon
    return d


_bearer = HTTPBearer(auto_error=False, description="The token from the daemon's --token-file "
                     "(required on TCP; the unix socket is guarded by its file mode)")


def check_token(conn: HTTPConnection, presented: str | None) -> None:
    d = daemon_of(conn)
    if d.token is None or conn.scope.get(TRANSPORT_KEY) == "unix" or \
            conn.scope.get(SESSION_KEY):
        return
    if presented is None or not hmac.compare_digest(presented.encode(), d.token.encode()):
        raise ApiError(401, "missing or wrong bearer token" if presented is None
                       else "wrong bearer token", kind="Unauthorized",
                       hint="send Authorization: Bearer <token from the daemon's --token-file>")


def require_token(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None,
                                                    Depends(_bearer)]) -> None:
    check_token(request, creds.credentials if creds else None)


def mark_transport(app: ASGIApp, transport: str) -> ASGIApp:
    """Wrap the app so handlers know the listener a request came in on (``unix`` needs no
    token: the socket's mode 0600 is the guard)."""
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, TRANSPORT_KEY: transport}
        await app(scope, receive, send)
    return wrapped


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(request)"


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
          ) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _on_vmforge_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "2"}
    return _json(status, error_body(exc, status), headers)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    body = getattr(exc, "body", None)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if request.url.path == "/v1/vms" and request.method == "POST" and first["loc"][:1] == \
            ("body",):
        # The same field-named message as the CLI's for the same document.
        from ..spec import parse_request
        try:
            parse_request(body, "request")
        except SpecError as spec_exc:
            return _json(422, error_body(spec_exc, 422))
    where = _loc(tuple(first.get("loc", ()))[1:])
    msg = "; ".join(f"{_loc(tuple(e['loc'])[1:])}: {e['msg']}" for e in errors[:5])
    return _json(422, {"error": "SpecError", "message": msg, "status": 422, "field": where,
                       "hint": "fix the field(s) named above"})


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {404: "NotFound", 405: "MethodNotAllowed", 401: "Unauthorized"}
    return _json(exc.status_code, {"error": kinds.get(exc.status_code, "HTTPError"),
                                   "message": str(exc.detail), "status": exc.status_code,
                                   "field": None, "hint": None},
                 dict(exc.headers) if exc.headers else None)


async def _on_internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json(500, error_body(exc, 500))


def create_app(manager: VmManager, token: str | None = None, *, supervise: bool = True,
               stream_limit: float | None = None, agent_idle: float = 1.0,
               reconcile_interval: float = 2.0) -> FastAPI:
    """The REST API over ``manager``. ``token``: the bearer token TCP clients must present
    (None: no token, for a unix socket only). ``supervise``: watch running VMs (QMP) and
    adopt them at start. ``stream_limit``: seconds after which follow-streams end (tests)."""
    bus = EventBus()
    d = Daemon(manager, bus, JobManager(bus), AgentPool(manager, idle=agent_idle),
               Supervisor(manager, bus, interval=reconcile_interval), token, stream_limit,
               supervise)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus.bind(asyncio.get_running_loop())
        if d.supervise:
            await d.supervisor.start()
        try:
            yield
        finally:
            await d.supervisor.close()
            await d.agents.close()
            await d.jobs.close()
            for t in list(d.background):
                t.cancel()

    app = FastAPI(
        title="vmforge node daemon", version=_version(), lifespan=lifespan,
        description="Create and run VMs, run commands in them and move files, manage the "
                    "image library, and follow every event. Errors are JSON with the field, "
                    "the message and a hint.",
        openapi_tags=[{"name": "vms"}, {"name": "guest"}, {"name": "images"},
                      {"name": "jobs"}, {"name": "events"}, {"name": "host"},
                      {"name": "snapshots"}, {"name": "pools"}])
    app.state.daemon = d
    app.add_exception_handler(VmforgeError, _on_vmforge_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_internal)

    from . import guest, images, system, validate, vms, web
    deps = [Depends(require_token)]
    for module in (vms, guest, images, system, validate):
        app.include_router(module.router, prefix="/v1", dependencies=deps,
                           responses=ERRORS)
    app.include_router(guest.ws_router, prefix="/v1")
    from .pools import router as pools_router  # warm pools (vmforge.node.pools)
    from .snapshots import router as snapshots_router  # snapshots, restores, clones
    for router in (snapshots_router, pools_router):
        app.include_router(router, prefix="/v1", dependencies=deps, responses=ERRORS)
    web.install(app)  # the console at / (login, pages, static files, session cookies)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("vmforge")
    except Exception:  # noqa: BLE001 - not installed (a source tree)
        return "0+unknown"


def dumps(data: Any) -> bytes:
    return (json.dumps(data, default=str, separators=(",", ":")) + "\n").encode()
