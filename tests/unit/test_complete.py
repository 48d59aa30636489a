"""Shell completion of VM names and image references, read from the state file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmforge.cli import complete
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import parse_request

from ..fakes import fake_host


def test_vm_names_and_image_refs_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    from vmforge.cli import common
    monkeypatch.setitem(common._state, "data_dir", None)  # no --data-dir from earlier tests
    monkeypatch.setenv("VMFORGE_HOME", str(tmp_path / "data"))
    assert complete.vm_names("") == []  # no state file yet: nothing, no error
    m = VmManager(DataDir(tmp_path / "data"), host=fake_host())
    k = tmp_path / "k"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel")
    for name in ("web-1", "web-2", "db"):
        m.create(parse_request({"name": name, "spec": {"kernel": {"image": "minimal"}}}))
    assert complete.vm_names("we") == ["web-1", "web-2"]
    assert complete.vm_names("") == ["db", "web-1", "web-2"]
    assert complete.image_refs("mi") == ["minimal", "minimal:1"]
