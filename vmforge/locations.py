"""Where things are, as plain strings: the data directory and a guest agent's address.

Kept free of pathlib, dataclasses and the rest of vmforge: `vmforge exec` reads both before it
has imported anything else (:mod:`vmforge.cli.fast`); :mod:`vmforge.paths` and
:class:`vmforge.hypervisors.base.AgentEndpoint` build on them.
"""

from __future__ import annotations

import os

__all__ = ["data_root", "agent_address"]


def data_root() -> str:
    """``$VMFORGE_HOME`` > ``$XDG_DATA_HOME/vmforge`` > ``~/.local/share/vmforge``."""
    home = os.environ.get("VMFORGE_HOME")
    if home:
        return home
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "vmforge")


def agent_address(kind: str, path: str | None = None, cid: int | None = None,
                  port: int | None = None) -> str:
    """The agent client's address syntax for an endpoint: a unix socket path (``unix``),
    ``vsock:CID:PORT`` (``vsock``) or ``hvsock:PATH:PORT`` (``hybrid-vsock``)."""
    if kind == "unix":
        return str(path)
    if kind == "vsock":
        return f"vsock:{cid}:{port}"
    return f"hvsock:{path}:{port}"
