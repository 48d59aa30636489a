"""The REST node daemon (FastAPI + uvicorn) over the library's VM manager.

Imported only by ``vmforge serve`` and by programs that embed the daemon: the CLI's other
commands never import FastAPI or uvicorn.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
