"""`vmforge serve`: the node daemon (REST API, events, supervision). FastAPI and uvicorn are
imported only when the command runs, so `vmforge --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import errors_reported

__all__ = ["register_serve", "serve_cmd"]


def serve_cmd(
    listen: Annotated[str | None, typer.Option(
        "--listen", help="Also listen on TCP HOST:PORT (requires the bearer token).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="Bearer token for TCP clients (created 0600 with a random token "
        "when missing; default DATA/token).")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="TLS certificate (PEM).")]
    = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="TLS private key (PEM).")]
    = None,
    socket_path: Annotated[Path | None, typer.Option(
        "--socket", help="Unix socket (default DATA/vmforge.sock, mode 0600).")] = None,
    no_unix: Annotated[bool, typer.Option("--no-unix", help="Do not listen on a unix socket.")]
    = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning.")]
    = "info",
    no_access_log: Annotated[bool, typer.Option("--no-access-log",
                                                help="Do not log every request.")] = False,
) -> None:
    """Run the node daemon: the REST API (/v1, OpenAPI at /openapi.json) over this host's VMs.
    VMs keep running when it stops; it adopts them when it starts again."""
    from .common import _state

    with errors_reported():
        from ..api.server import ServeOptions, serve
        serve(ServeOptions(data_dir=_state["data_dir"], socket_path=socket_path,
                           unix=not no_unix, listen=listen, token_file=token_file,
                           tls_cert=tls_cert, tls_key=tls_key, log_level=log_level,
                           access_log=not no_access_log))


def register_serve(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
