"""cloud-init NoCloud seeds: validated content, defaults, and the ISO/vfat writers.

Names are imported on first use, so `vmforge seed build` loads only what it needs.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: the seed path must not import it
if TYPE_CHECKING:
    from typing import Any

    from .build import Seed, build_seed, default_user_data, find_ssh_public_key, inject_agent
    from .writers import write_iso, write_seed, write_vfat

__all__ = ["Seed", "build_seed", "default_user_data", "find_ssh_public_key", "inject_agent",
           "write_iso", "write_vfat", "write_seed"]

_WHERE = {"Seed": "build", "build_seed": "build", "default_user_data": "build",
          "find_ssh_public_key": "build", "inject_agent": "build", "write_iso": "writers",
          "write_vfat": "writers", "write_seed": "writers"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
