"""Golden files: compare generated artifacts; VMFORGE_REGEN_GOLDEN=1 rewrites them."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VMFORGE_REGEN_GOLDEN") == "1" or not path.exists():
        if os.environ.get("CI") and not path.exists():
            raise AssertionError(f"golden file {name} is missing")
        path.write_text(actual)
    expected = path.read_text()
    assert actual == expected, (f"{name} differs from the golden file; if the change is "
                                "intended, rerun with VMFORGE_REGEN_GOLDEN=1")
