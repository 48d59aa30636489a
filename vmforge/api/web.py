"""The web console the daemon serves at ``/``: hand-written HTML, one small vanilla JS module
per page and a style sheet (``web/static/``, package data; no build step). The pages talk to
the same ``/v1`` API as every other client.

Authentication (TCP listener; the unix socket needs none, as for the API):

* ``GET /login`` is a form; ``POST /login`` with the field ``token`` (the daemon's bearer
  token, compared in constant time) starts a session: a random id in the cookie
  ``vmforge_session`` (HttpOnly, SameSite=Strict, Path=/, Secure over TLS, 12 hours). The
  token itself is never put in a cookie, a URL or a log line. Sessions live in the daemon's
  memory: ``POST /logout`` ends one, a daemon restart ends them all.
* Every API route accepts that cookie instead of ``Authorization: Bearer`` (the middleware
  marks the request; :func:`vmforge.api.app.check_token` honours the mark). A page without a
  session redirects to the login form; the API answers 401.

CSRF: the session cookie alone never authorises a state-changing request. A POST, PUT,
PATCH or DELETE that relies on the cookie must carry ``X-CSRF-Token`` equal to the session's
own random CSRF token (a synchronizer token: the server keeps it with the session and puts it
in every page it serves, ``<meta name="csrf-token">``; a custom header also forces a CORS
pre-flight, which this server never grants). On top of that, any state-changing request or
WebSocket that comes from a browser (it has an ``Origin`` header) must come from this same
origin (host and port), whatever its credentials: this also guards the unix socket when
someone forwards it to a local TCP port, and the login form. Cookies are SameSite=Strict, so
other sites' requests do not carry them at all in current browsers.

Pages are served with a strict Content-Security-Policy (scripts and styles from this origin
only; no inline script), ``X-Frame-Options: DENY`` and ``Referrer-Policy: same-origin``
(``no-referrer`` would make browsers send ``Origin: null`` with the pages' own POSTs). The JS
builds the DOM with ``textContent`` only. Static files (``/static/``) carry no data and are
served without a session (the login page needs its style sheet).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..spec import NAME_RE
from .app import SESSION_KEY, TRANSPORT_KEY, daemon_of

__all__ = ["install", "Sessions", "WebAuth", "SESSION_COOKIE", "CSRF_HEADER", "SESSION_KEY",
           "STATIC"]

log = logging.getLogger("vmforge.api.web")

STATIC = Path(__file__).parent / "web" / "static"
SESSION_COOKIE = "vmforge_session"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 1000
MAX_FORM = 16 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PAGES = {"vms": "vms.html", "create": "create.html", "vm": "vm.html", "images": "images.html"}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store"}


@dataclass
class Session:
    csrf: str
    expires: float


class Sessions:
    """Web sessions in memory, keyed by the sha256 of their id (the id itself, the cookie's
    value, is not kept)."""

    def __init__(self, ttl: float = SESSION_TTL, cap: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.cap = cap
        self._by_hash: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    def new(self) -> tuple[str, Session]:
        now = time.time()
        for k in [k for k, s in self._by_hash.items() if s.expires <= now]:
            del self._by_hash[k]
        while len(self._by_hash) >= self.cap:
            self._by_hash.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        sess = Session(secrets.token_urlsafe(32), now + self.ttl)
        self._by_hash[self._key(sid)] = sess
        return sid, sess

    def find(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        sess = self._by_hash.get(self._key(sid))
        if sess is None or sess.expires <= time.time():
            return None
        return sess

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_hash.pop(self._key(sid), None)

    def __len__(self) -> int:
        return len(self._by_hash)


def _same_origin(origin: str, headers: Headers) -> bool:
    """The ``Origin`` names this server as the browser reached it (its ``Host``)."""
    if origin == "null":
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    host = headers.get("host")
    return bool(netloc) and host is not None and netloc.lower() == host.lower()


async def _refuse(scope: Scope, receive: Receive, send: Send, message: str,
                  hint: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    from fastapi.responses import JSONResponse
    resp = JSONResponse({"error": "Forbidden", "message": message, "status": 403,
                         "field": None, "hint": hint}, status_code=403)
    await resp(scope, receive, send)


class WebAuth:
    """ASGI middleware: the session cookie as credentials, with the CSRF and origin checks
    described in the module docstring."""

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        unsafe = scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS
        origin = headers.get("origin")
        if unsafe and origin is not None and not _same_origin(origin, headers):
            log.warning("refused a cross-origin %s %s (Origin %s)", scope.get("method", "WS"),
                        scope.get("path"), origin[:100])
            await _refuse(scope, receive, send, "cross-origin request refused",
                          "use the console from the daemon's own address")
            return
        sid = cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)
        sess = self.sessions.find(sid) if sid else None
        if sess is not None and "authorization" not in headers:
            # The login form needs no CSRF token: it uses no session (it makes a new one
            # from the token in its body) and the origin check above applies.
            if unsafe and scope["type"] == "http" and scope.get("path") != "/login":
                presented = headers.get(CSRF_HEADER, "")
                if not hmac.compare_digest(presented.encode(), sess.csrf.encode()):
                    await _refuse(scope, receive, send,
                                  "missing or wrong X-CSRF-Token for this session",
                                  "send the page's csrf-token in X-CSRF-Token (reload the "
                                  "page to get a fresh one)")
                    return
            scope = {**scope, SESSION_KEY: sid}
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- pages

router = APIRouter(include_in_schema=False)


def _sessions(request: Request) -> Sessions:
    s: Sessions = request.app.state.web_sessions
    return s


def _open(request: Request) -> bool:
    """No login needed: the unix socket, or a daemon without a token."""
    return daemon_of(request).token is None or request.scope.get(TRANSPORT_KEY) == "unix"


def _bearer_ok(request: Request) -> bool:
    auth = request.headers.get("authorization", "")
    token = daemon_of(request).token
    return token is not None and auth.lower().startswith("bearer ") and \
        hmac.compare_digest(auth[7:].encode(), token.encode())


def _csrf_for(request: Request) -> str | None:
    """The page's CSRF token ("" where none is needed); None: not logged in."""
    if _open(request) or _bearer_ok(request):
        return ""
    sid = request.scope.get(SESSION_KEY)
    sess = _sessions(request).find(sid) if sid else None
    return sess.csrf if sess is not None else None


_cache: dict[str, str] = {}


def _template(name: str) -> str:
    if name not in _cache:
        _cache[name] = (STATIC / name).read_text(encoding="utf-8")
    return _cache[name]


def _page(request: Request, page: str) -> Response:
    csrf = _csrf_for(request)
    if csrf is None:
        back = "" if request.url.path == "/" else f"?next={quote(request.url.path)}"
        return RedirectResponse(f"/login{back}", status_code=303,
                                headers={"Cache-Control": "no-store"})
    body = _template(PAGES[page]).replace("{{csrf}}", html.escape(csrf, quote=True))
    return HTMLResponse(body, headers=PAGE_HEADERS)


@router.get("/")
async def vms_page(request: Request) -> Response:
    return _page(request, "vms")


@router.get("/create")
async def create_page(request: Request) -> Response:
    return _page(request, "create")


@router.get("/images")
async def images_page(request: Request) -> Response:
    return _page(request, "images")


@router.get("/vms/{name}")
async def vm_page(request: Request, name: str) -> Response:
    if not NAME_RE.fullmatch(name):
        return HTMLResponse("<!doctype html><title>Not found</title><p>No such VM name.",
                            status_code=404, headers=PAGE_HEADERS)
    return _page(request, "vm")


def _local_path(value: str | None) -> str:
    """Where to go after logging in: a path of this site only (no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value \
            or any(c in value for c in "\r\n\t") or len(value) > 300:
        return "/"
    return value


def _login_form(message: str = "", status: int = 200, next_path: str = "/") -> HTMLResponse:
    text = _template("login.html").replace(
        'name="next" value="/"', f'name="next" value="{html.escape(next_path, quote=True)}"')
    if message:
        text = text.replace("<!--error-->", html.escape(message)).replace(
            'id="login-error" hidden', 'id="login-error"')
    return HTMLResponse(text, status_code=status, headers=PAGE_HEADERS)


@router.get("/login")
async def login_page(request: Request) -> Response:
    next_path = _local_path(request.query_params.get("next"))
    if _csrf_for(request) is not None:
        return RedirectResponse(next_path, status_code=303)
    return _login_form(next_path=next_path)


@router.post("/login")
async def login(request: Request) -> Response:
    if _open(request):
        return RedirectResponse("/", status_code=303)
    token = daemon_of(request).token
    assert token is not None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FORM:
            return _login_form("The form is too large.", 413)
    if ctype != "application/x-www-form-urlencoded":
        return _login_form("Send the login form (application/x-www-form-urlencoded).", 415)
    try:
        fields = parse_qs(raw.decode("utf-8"), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        fields = {}
    presented = (fields.get("token") or [""])[0].strip()
    next_path = _local_path((fields.get("next") or ["/"])[0])
    if not presented or not hmac.compare_digest(presented.encode(), token.encode()):
        client = request.client.host if request.client else "?"
        log.warning("failed web console login from %s", client)
        await asyncio.sleep(0.3)  # a little friction for guessing (the token has 256 bits)
        return _login_form("That is not the daemon's token." if presented else
                           "Enter the token.", 401, next_path)
    sessions = _sessions(request)
    old = request.cookies.get(SESSION_COOKIE)
    sessions.drop(old)  # a fresh id at every login: no session fixation
    sid, _sess = sessions.new()
    resp = RedirectResponse(next_path, status_code=303, headers={"Cache-Control": "no-store"})
    resp.set_cookie(SESSION_COOKIE, sid, max_age=int(sessions.ttl), path="/", httponly=True,
                    samesite="strict", secure=request.url.scheme == "https")
    log.info("web console login from %s", request.client.host if request.client else "?")
    return resp


@router.post("/logout")
async def logout(request: Request) -> Response:
    # A cookie-authenticated POST only gets here with the right X-CSRF-Token (WebAuth).
    sid = request.scope.get(SESSION_KEY)
    if sid:
        _sessions(request).drop(sid)
    resp = RedirectResponse("/login", status_code=303, headers={"Cache-Control": "no-store"})
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                       secure=request.url.scheme == "https")
    return resp


class _Static(StaticFiles):
    """Static files with nosniff and revalidation (they change with the package)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        resp = await super().get_response(path, scope)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Cache-Control", "no-cache")
        return resp


def install(app: FastAPI) -> None:
    """Add the console to the daemon's application: pages, static files, the middleware."""
    sessions = Sessions()
    app.state.web_sessions = sessions
    app.include_router(router)
    app.mount("/static", _Static(directory=STATIC), name="static")
    app.add_middleware(WebAuth, sessions=sessions)
