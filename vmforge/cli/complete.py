"""Shell completion (bash, zsh: `vmforge --install-completion`): names of VMs and images,
read straight from the state file so a <TAB> costs no more than opening it."""

from __future__ import annotations

import sqlite3
from typing import Annotated

import typer

__all__ = ["vm_names", "image_refs", "VmName", "VmNames", "ImageRef"]


def _query(sql: str) -> list[str]:
    from ..paths import default_data_dir
    from .common import _state
    root = _state.get("data_dir") or default_data_dir()
    try:
        conn = sqlite3.connect(f"file:{root}/state.db?mode=ro", uri=True, timeout=1)
        try:
            return [r[0] for r in conn.execute(sql)]
        finally:
            conn.close()
    except sqlite3.Error:
        return []


def vm_names(incomplete: str) -> list[str]:
    return [n for n in _query("SELECT name FROM vms ORDER BY name") if n.startswith(incomplete)]


def image_refs(incomplete: str) -> list[str]:
    refs = _query("SELECT DISTINCT name FROM images UNION "
                  "SELECT name || ':' || version FROM images ORDER BY 1")
    return [r for r in refs if r.startswith(incomplete)]


ImageRef = Annotated[str, typer.Argument(help="NAME[:VERSION]", autocompletion=image_refs)]
VmName = Annotated[str, typer.Argument(help="VM name.", autocompletion=vm_names)]
VmNames = Annotated[list[str], typer.Argument(help="VM name(s).", autocompletion=vm_names)]
