"""Run the node daemon: uvicorn on a unix socket in the data directory (mode 0600), and on
TCP when asked (``--listen HOST:PORT``), where a bearer token is required and TLS is used
when given a certificate and key.

The token lives in a file (created 0600 with a random token when missing). It is never
logged or printed: the log says which file holds it.

Two uvicorn servers share one event loop and one application: the unix listener runs the
application's lifespan (supervisor, jobs), the TCP one does not. Signals (SIGINT, SIGTERM,
SIGHUP) stop both; running VMs are left running (the next daemon adopts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ..errors import SpecError, VmforgeError
from ..node.manager import VmManager
from ..paths import DataDir
from .app import create_app, mark_transport

__all__ = ["ServeOptions", "serve", "read_or_create_token", "parse_listen", "SOCKET_NAME"]

log = logging.getLogger("vmforge.api.server")

SOCKET_NAME = "vmforge.sock"


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path | None = None
    socket_path: Path | None = None      # default: DATA/vmforge.sock
    unix: bool = True
    listen: str | None = None            # HOST:PORT
    token_file: Path | None = None       # default: DATA/token
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = "info"
    access_log: bool = True


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SpecError(f"--listen {value!r} is not HOST:PORT", field="--listen",
                        hint="e.g. --listen 127.0.0.1:7443 or --listen [::]:7443")
    return host, int(port)


def read_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one (file created 0600) when it is missing. A
    token file others can read is refused, as ssh refuses such keys."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise VmforgeError(f"cannot create the token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("created a new token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        st = path.stat()
        token = path.read_text().strip()
    except OSError as exc:
        raise VmforgeError(f"cannot read the token file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise VmforgeError(f"the token file {path} is readable by others "
                           f"(mode {stat.S_IMODE(st.st_mode):04o})", hint=f"chmod 600 {path}")
    if len(token) < 16:
        raise VmforgeError(f"the token file {path} holds no usable token (16 characters "
                           "at least)", hint=f"remove {path} to have a new one made")
    return token


def _unix_socket(path: Path) -> socket.socket:
    if len(str(path).encode()) > 100:
        raise VmforgeError(f"the socket path {path} is too long for a unix socket",
                           hint="give a shorter --socket")
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its daemon is gone
        else:
            raise VmforgeError(f"another daemon is listening on {path}",
                               hint="stop it first (its VMs keep running)")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window in which others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(256)
    sock.set_inheritable(False)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "pick another port" if exc.errno == errno.EADDRINUSE else None
        raise VmforgeError(f"cannot listen on {host}:{port}: {exc.strerror}",
                           hint=hint) from None
    sock.listen(256)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us (two servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Redact(logging.Filter):
    """Keeps secrets out of every log line, whoever logs them (at debug level the websockets
    library logs handshake headers, Authorization included)."""

    def __init__(self, secrets_: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets_ if s]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logged as it is
            return True
        if any(s in text for s in self.secrets):
            for s in self.secrets:
                text = text.replace(s, "<redacted>")
            record.msg, record.args = text, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and any(s in record.exc_text for s in self.secrets):
            for s in self.secrets:
                record.exc_text = record.exc_text.replace(s, "<redacted>")
        return True


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _redact_logs(token: str) -> None:
    redact = _Redact([token, f"Bearer {token}"])
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)


async def _run(servers: list[tuple[_Server, socket.socket]]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for srv, _ in servers:
            srv.should_exit = True
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop)
    # The unix server (with the lifespan) starts first, so the supervisor runs before TCP
    # clients arrive.
    first, rest = servers[0], servers[1:]
    tasks = [asyncio.create_task(first[0].serve(sockets=[first[1]]))]
    while not first[0].started and not tasks[0].done():
        await asyncio.sleep(0.01)
    tasks += [asyncio.create_task(s.serve(sockets=[k])) for s, k in rest]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


def serve(opts: ServeOptions) -> None:
    _logging(opts.log_level)
    data = DataDir(opts.data_dir) if opts.data_dir else DataDir.default()
    manager = VmManager(data)
    token = None
    tcp: tuple[str, int] | None = None
    if opts.listen:
        tcp = parse_listen(opts.listen)
        token = read_or_create_token(opts.token_file or data.root / "token")
        _redact_logs(token)
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise SpecError("TLS needs both --tls-cert and --tls-key", field="--tls-cert")
    if opts.tls_cert and not tcp:
        raise SpecError("TLS is for the TCP listener: add --listen HOST:PORT",
                        field="--tls-cert")
    if not opts.unix and not tcp:
        raise SpecError("nothing to listen on: give --listen or keep the unix socket",
                        field="--no-unix")
    app = create_app(manager, token)
    servers: list[tuple[_Server, socket.socket]] = []
    common = {"log_config": None, "log_level": opts.log_level,
              "access_log": opts.access_log, "timeout_keep_alive": 75,
              "ws": "websockets-sansio"}
    sock_path = None
    if opts.unix:
        sock_path = opts.socket_path or data.root / SOCKET_NAME
        usock = _unix_socket(sock_path)
        servers.append((_Server(uvicorn.Config(mark_transport(app, "unix"), lifespan="on",
                                               **common)), usock))  # type: ignore[arg-type]
    if tcp:
        tsock = _tcp_socket(*tcp)
        ssl = {"ssl_certfile": str(opts.tls_cert), "ssl_keyfile": str(opts.tls_key)} \
            if opts.tls_cert else {}
        servers.append((_Server(uvicorn.Config(mark_transport(app, "tcp"),
                                               lifespan="off" if servers else "on",
                                               **common, **ssl)), tsock))  # type: ignore
        scheme = "https" if opts.tls_cert else "http"
        host, port = tsock.getsockname()[:2]
        log.info("listening on %s://%s:%s (bearer token from %s)", scheme, host, port,
                 opts.token_file or data.root / "token")
    if sock_path:
        log.info("listening on unix://%s (mode 0600)", sock_path)
    log.info("data directory %s; pid %d", data.root, os.getpid())
    try:
        asyncio.run(_run(servers))
    finally:
        for _, s in servers:
            s.close()
        if sock_path is not None:
            with contextlib.suppress(OSError):
                sock_path.unlink()
        manager.close()
        log.info("stopped (running VMs keep running)")
