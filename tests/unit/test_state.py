"""The state file: schema migrations, broken rows, thread safety, owner-only modes."""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from vmforge.node.manager import VmManager
from vmforge.node.states import VmState
from vmforge.paths import DataDir
from vmforge.spec import parse_request
from vmforge.state import SCHEMA_V1, SCHEMA_VERSION, Database

from ..fakes import fake_host


def v1_state_file(path: Path, vm_dir: Path) -> None:
    """A state file exactly as vmforge 0.1 wrote it (no user_version, QEMU-shaped columns)."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1)
    conn.execute("INSERT INTO images (name, version, kind, files, created_at) VALUES "
                 "('minimal', 1, 'kernel', '{}', 0)")
    conn.execute("INSERT INTO vms (name, state, spec, dir, pid, accel, created_at, owner_pid, "
                 "agent_endpoint) VALUES ('old', 'running', ?, ?, 4242, 'tcg', 1, 1, NULL)",
                 (json.dumps({"name": "old", "spec": {"kernel": {"image": "minimal"}}}),
                  str(vm_dir)))
    conn.execute("INSERT INTO vm_images VALUES ('old', 1)")
    conn.commit()
    conn.close()


def test_v1_state_file_upgrades_in_place(tmp_path: Path) -> None:
    db_path = tmp_path / "state.db"
    v1_state_file(db_path, tmp_path / "vms" / "old")
    db = Database(db_path)
    assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    row = db.query("SELECT * FROM vms WHERE name='old'")[0]
    rt = json.loads(row["runtime"])
    assert rt["pid"] == 4242 and rt["backend"] == "qemu" and rt["accel"] == "tcg"
    assert rt["marker"].endswith("qmp.sock") and rt["agent"]["kind"] == "unix"
    pins = [tuple(r) for r in db.query("SELECT vm_name, role, image_id FROM vm_images")]
    assert pins == [("old", "legacy:1", 1)]
    db.close()
    Database(db_path).close()  # opening it again is a no-op
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    from vmforge.state import StateError
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.execute("CREATE TABLE vms (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer vmforge"):
        Database(tmp_path / "state.db")


def test_unparsable_stored_spec_shows_as_broken_and_rm_works(tmp_path: Path) -> None:
    import asyncio
    m = VmManager(DataDir(tmp_path / "data"), host=fake_host())
    k = tmp_path / "k"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel")
    m.create(parse_request({"name": "good", "spec": {"kernel": {"image": "minimal"}}}))
    m.create(parse_request({"name": "bad", "spec": {"kernel": {"image": "minimal"}}}))
    with m.db.tx() as c:  # written under an older model revision that this one refuses
        c.execute("UPDATE vms SET spec=?, spec_rev=0 WHERE name='bad'",
                  (json.dumps({"name": "bad", "spec": {"cpu_cores": "many"}}),))
    recs = {r.name: r for r in m.vms()}
    assert recs["good"].state is VmState.CREATED and recs["good"].request is not None
    assert recs["bad"].state is VmState.BROKEN and "cpu_cores" in (recs["bad"].last_error or "")
    assert "spec" not in recs["bad"].as_dict()
    asyncio.run(m.delete("bad", force=True))
    assert [r.name for r in m.vms()] == ["good"]
    assert not (m.data.vms / "bad").exists()


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.db")
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(20):
                with db.tx() as c:
                    c.execute("INSERT INTO images (name, version, kind, files, created_at) "
                              "VALUES (?, ?, 'disk', '{}', 0)", (f"img{i}", j))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db.query("SELECT COUNT(*) FROM images")[0][0] == 160
    db.close()


def test_everything_under_the_data_dir_is_owner_only(tmp_path: Path) -> None:
    m = VmManager(DataDir(tmp_path / "data"), host=fake_host())
    k = tmp_path / "k"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel")
    disk = tmp_path / "base.raw"  # a raw image: the overlay header is written in-process
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
        f.write(b"\x55\xaa")
    m.create(parse_request({"name": "sec", "spec": {
        "disks": [{"id": "root", "bootable": True, "backing_file": str(disk)}],
        "cloud_init": {"user_data": "#cloud-config\npassword: hunter2\nchpasswd: "
                                    "{expire: false}\n"}}}))
    for p in [m.data.root, *m.data.root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if p.is_dir():
            assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
        elif p.parent.name == "blobs":
            assert mode & 0o022 == 0, f"{p} is {oct(mode)}"  # read-only blobs, dir is 0700
        else:
            assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
    assert (m.data.vms / "sec" / "seed.iso").exists()


def test_inspect_redacts_user_data_unless_asked(tmp_path: Path) -> None:
    m = VmManager(DataDir(tmp_path / "data"), host=fake_host())
    k = tmp_path / "k"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel")
    m.create(parse_request({"name": "sec", "spec": {
        "kernel": {"image": "minimal"},
        "cloud_init": {"user_data": "#cloud-config\npassword: hunter2\n",
                       "vendor_data": "#cloud-config\nruncmd: [echo token=abc]\n"}}}))
    shown = json.dumps(m.get("sec").as_dict())
    assert "hunter2" not in shown and "token=abc" not in shown and "redacted" in shown
    assert "hunter2" in json.dumps(m.get("sec").as_dict(show_secrets=True))


@pytest.mark.subprocess
def test_ensure_keeps_a_granted_acl_and_closes_plain_permissions(tmp_path: Path) -> None:
    """DataDir.ensure() runs in every vmforge process: it must close directories that are open
    to group or others, but not take away an ACL the libvirt driver granted (the group bits
    of a directory with an ACL are its mask)."""
    import shutil
    import subprocess

    from vmforge.paths import DataDir
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl (package acl) is not installed")
    data = DataDir(tmp_path / "d").ensure()
    data.vms.chmod(0o755)
    subprocess.run(["setfacl", "-m", "u:nobody:rx", str(data.images)], check=True)
    DataDir(tmp_path / "d").ensure()
    assert data.vms.stat().st_mode & 0o777 == 0o700
    acl = subprocess.run(["getfacl", "-p", str(data.images)], capture_output=True, text=True,
                         check=True).stdout
    assert "user:nobody:r-x" in acl and "#effective" not in acl  # the mask still lets it in
    assert "group::---" in acl and "other::---" in acl
