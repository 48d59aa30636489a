"""A typed Python client of the node daemon's REST API (``vmforge serve``).

::

    from vmforge.client import Client
    with Client("unix:///var/lib/vmforge/vmforge.sock") as c:       # or https://node:7443
        c.create({"name": "web-1", "spec": {...}}, wait="ready")
        res = c.exec("web-1", ["uname", "-a"], on_output=lambda s, b: print(b.decode()))
        c.put_file("web-1", "app.tar", "/opt/app.tar")
        snap = c.snapshot("web-1")                      # memory, devices and disk layers
        c.restore(snap["ref"], "web-2")                 # or c.clone("web-1", "web-2")
        c.create_pool("warm", 2, from_snapshot=snap["ref"]); c.take("warm", "web-3")

``AsyncClient`` has the same methods as coroutines. Errors are vmforge's own exception types
(``SpecError`` with ``field``, ``VmNotFound``, ``InvalidState``, ...), rebuilt from the
daemon's JSON errors, so a program (or the CLI in remote mode) handles them as it would
locally.
"""

from __future__ import annotations

from .http import AsyncClient, Client, ClientExecResult, DaemonError, resolve_host

__all__ = ["Client", "AsyncClient", "ClientExecResult", "DaemonError", "resolve_host"]
