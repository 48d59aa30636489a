"""vmforge: build VM images and provision virtual machines from them.

The public API is loaded lazily (``vmforge --help`` must not pay for pydantic or asyncio)::

    from vmforge import VmManager, load_request
    m = VmManager()
    rec = m.run(load_request("examples/minimal.yaml"))
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: `vmforge seed build` and `exec` must not import it
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "VmManager": "vmforge.node.manager", "VmRecord": "vmforge.node.manager",
    "DataDir": "vmforge.paths", "VmRequest": "vmforge.spec", "VmSpec": "vmforge.spec",
    "load_request": "vmforge.spec", "parse_request": "vmforge.spec",
    "Library": "vmforge.images.library", "Image": "vmforge.images.library",
    "AgentClient": "vmforge.agent.client", "Seed": "vmforge.seed",
    "build_seed": "vmforge.seed", "write_iso": "vmforge.seed", "write_vfat": "vmforge.seed",
    "VmforgeError": "vmforge.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vmforge' has no attribute {name!r}")
