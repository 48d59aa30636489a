"""The `vmforge` entry point: the fast commands first (vmforge.cli.fast), typer for the rest.

Kept tiny on purpose: what this module imports, every command pays for.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["main"]


def _interrupt_on(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP (what `timeout` and service managers send) clean up exactly like
    Ctrl-C: hand them to whatever handles SIGINT now (asyncio's runner cancels its task, plain
    Python raises KeyboardInterrupt)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt_on)
    from .fast import dispatch
    completing = "_VMFORGE_COMPLETE" in os.environ  # shell completion: typer answers it
    code = None if completing else dispatch(sys.argv[1:])
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)
    from .main import run_app
    run_app()
