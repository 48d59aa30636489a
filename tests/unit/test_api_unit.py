"""The REST API in-process (FastAPI TestClient), with a manager on a temporary data directory
and no VMs: authentication, errors as JSON with the field, nothing left on disk by refused
requests, the event stream's ids and resume, OpenAPI. No processes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes import fake_host
from vmforge.api import create_app
from vmforge.api.app import mark_transport
from vmforge.api.events import EventBus
from vmforge.api.supervisor import exit_reason, locks_held
from vmforge.node.manager import VmManager
from vmforge.node.states import ExitReason
from vmforge.paths import DataDir

TOKEN = "unit-test-token-5f1c2a9d8e7b6a5c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data").ensure()


@pytest.fixture
def manager(data: DataDir) -> Iterator[VmManager]:
    m = VmManager(data, host=fake_host())
    yield m
    m.close()


@pytest.fixture
def client(manager: VmManager) -> Iterator[TestClient]:
    app = create_app(manager, TOKEN, supervise=False, stream_limit=0.2)
    with TestClient(app) as c:
        yield c


def nothing_on_disk(data: DataDir, manager: VmManager) -> None:
    assert list(data.vms.iterdir()) == []
    assert list(data.locks.iterdir()) == []
    assert manager.vms() == []
    assert not (data.root.parent / "x").exists()


def minimal_kernel_spec(tmp_path: Path, name: str = "api-vm") -> dict[str, Any]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"\x7fELF kernel")
    initrd.write_bytes(b"initrd")
    return {"name": name, "spec": {"memory_mib": 256,
                                   "kernel": {"kernel": str(kernel), "initrd": str(initrd)}}}


# -- authentication
def test_no_token_is_401_and_nothing_done(client: TestClient, data: DataDir,
                                          manager: VmManager, tmp_path: Path) -> None:
    r = client.post("/v1/vms", params={"start": False}, json=minimal_kernel_spec(tmp_path))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "Unauthorized"
    nothing_on_disk(data, manager)


def test_wrong_token_is_401(client: TestClient) -> None:
    for header in ("Bearer nope", f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}"):
        r = client.get("/v1/vms", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert TOKEN not in r.text


def test_right_token_and_unix_socket(manager: VmManager) -> None:
    app = create_app(manager, TOKEN, supervise=False)
    with TestClient(app) as c:
        assert c.get("/v1/vms", headers=AUTH).json() == []
    with TestClient(mark_transport(app, "unix")) as c:  # the socket's mode is the guard
        assert c.get("/v1/vms").status_code == 200
    with TestClient(mark_transport(app, "tcp")) as c:
        assert c.get("/v1/vms").status_code == 401


def test_openapi_needs_no_token_and_lists_the_api(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for p in ("/v1/vms", "/v1/vms/{name}", "/v1/vms/{name}/start", "/v1/vms/{name}/stop",
              "/v1/vms/{name}/kill", "/v1/vms/{name}/console", "/v1/vms/{name}/exec",
              "/v1/vms/{name}/files", "/v1/vms/{name}/health", "/v1/images",
              "/v1/images/{ref}", "/v1/images/pull", "/v1/images/import",
              "/v1/images/build", "/v1/images/prune", "/v1/jobs/{job_id}", "/v1/events",
              "/v1/host"):
        assert p in paths, p
    assert "delete" in paths["/v1/vms/{name}"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "422" in paths["/v1/vms"]["post"]["responses"]


# -- errors
def test_missing_backing_file_is_422_with_field(client: TestClient, data: DataDir,
                                                manager: VmManager) -> None:
    req = {"name": "web-server-01", "spec": {
        "cpu_cores": 2, "memory_mib": 1024, "firmware": "FIRMWARE_UEFI",
        "boot_order": ["BOOT_DEVICE_DISK"],
        "disks": [{"id": "boot", "size_gib": 20, "bootable": True,
                   "backing_file": "/nonexistent/base.qcow2"}],
        "cloud_init": {"user_data": "#cloud-config\nhostname: web-server-01\n"}}}
    r = client.post("/v1/vms", json=req, headers=AUTH)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "SpecError"
    assert body["field"] == "spec.disks[0].backing_file"
    assert "/nonexistent/base.qcow2" in body["message"]
    assert body["hint"]
    nothing_on_disk(data, manager)


def test_bad_spec_fields_are_named(client: TestClient) -> None:
    cases = [({"name": "a", "spec": {"memory_mib": -1}}, "spec.memory_mib"),
             ({"name": "a", "spec": {"firmware": "FIRMWARE_NOPE"}}, "spec.firmware"),
             ({"name": "a", "spec": {"disks": [{"id": "d"}]}}, "spec.disks[0]"),
             ({"name": "a", "spec": {"bogus": 1}}, "spec.bogus"),
             ({"spec": {}}, "name")]
    for req, field in cases:
        r = client.post("/v1/vms", json=req, headers=AUTH)
        assert r.status_code == 422, (req, r.text)
        assert r.json()["field"] == field, (req, r.json())
    r = client.post("/v1/vms", content=b"{not json", headers={**AUTH,
                                                              "Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "-a", "x" * 64, "a_b", ""])
def test_hostile_names_are_422_and_nothing_on_disk(client: TestClient, data: DataDir,
                                                   manager: VmManager, tmp_path: Path,
                                                   name: str) -> None:
    req = minimal_kernel_spec(tmp_path, name)
    r = client.post("/v1/vms", json=req, params={"start": False}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "name"
    nothing_on_disk(data, manager)


@pytest.mark.parametrize("path", ["/v1/vms/..%2Fx", "/v1/vms/a_b", "/v1/vms/-x/kill",
                                  "/v1/vms/a%2F..%2F..%2Fx/stop"])
def test_hostile_names_in_paths(client: TestClient, data: DataDir, manager: VmManager,
                                path: str) -> None:
    method = "POST" if path.endswith(("kill", "stop")) else "GET"
    r = client.request(method, path, headers=AUTH)
    assert r.status_code in (404, 422), r.text
    assert r.json()["error"] in ("NotFound", "SpecError")
    r = client.delete(path, headers=AUTH)
    assert r.status_code in (404, 405, 422)
    nothing_on_disk(data, manager)


def test_not_found(client: TestClient) -> None:
    for method, path in (("GET", "/v1/vms/nope"), ("POST", "/v1/vms/nope/start"),
                         ("POST", "/v1/vms/nope/stop"), ("POST", "/v1/vms/nope/kill"),
                         ("DELETE", "/v1/vms/nope"), ("GET", "/v1/vms/nope/console"),
                         ("GET", "/v1/images/nope"), ("DELETE", "/v1/images/nope:3"),
                         ("GET", "/v1/jobs/job-000000000000"), ("GET", "/v1/nothing")):
        r = client.request(method, path, headers=AUTH)
        assert r.status_code == 404, (method, path, r.text)
        assert set(r.json()) >= {"error", "message", "status", "field", "hint"}
    r = client.post("/v1/vms/nope/exec", json={"argv": ["true"]}, headers=AUTH)
    assert r.status_code == 404
    r = client.put("/v1/vms/nope/files", params={"path": "/tmp/x"}, content=b"x",
                   headers=AUTH)
    assert r.status_code == 404


def test_create_without_start_then_delete(client: TestClient, data: DataDir,
                                          manager: VmManager, tmp_path: Path) -> None:
    req = minimal_kernel_spec(tmp_path)
    req["spec"]["cloud_init"] = {"user_data": "#cloud-config\npassword: hunter2\n"}
    r = client.post("/v1/vms", json=req, params={"start": False}, headers=AUTH)
    assert r.status_code == 201, r.text
    vm = r.json()
    assert vm["state"] == "created" and vm["links"]["self"] == "/v1/vms/api-vm"
    assert "hunter2" not in r.text  # user-data is redacted
    assert r.headers["location"] == "/v1/vms/api-vm"
    again = client.post("/v1/vms", json=req, params={"start": False}, headers=AUTH)
    assert again.status_code == 409 and again.json()["error"] == "VmExists"
    assert client.post("/v1/vms/api-vm/kill", headers=AUTH).status_code == 409
    assert [v["name"] for v in client.get("/v1/vms", headers=AUTH).json()] == ["api-vm"]
    shown = client.get("/v1/vms/api-vm", params={"show_secrets": True}, headers=AUTH)
    assert "hunter2" in shown.text
    assert client.get("/v1/vms/api-vm/console", headers=AUTH).status_code == 200
    r = client.delete("/v1/vms/api-vm", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"name": "api-vm", "deleted": True}
    nothing_on_disk(data, manager)
    events = client.get("/v1/events", params={"replay": True, "follow": False, "vm": "api-vm"},
                        headers=AUTH)
    states = [json.loads(line[6:])["state"] for line in events.text.splitlines()
              if line.startswith("data: ") and '"state"' in line]
    assert states == ["created", "deleted"]


def test_exec_needs_a_running_vm(client: TestClient, tmp_path: Path) -> None:
    client.post("/v1/vms", json=minimal_kernel_spec(tmp_path), params={"start": False},
                headers=AUTH)
    r = client.post("/v1/vms/api-vm/exec", json={"argv": ["true"]}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "InvalidState"
    r = client.post("/v1/vms/api-vm/exec", json={"argv": []}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "argv"
    r = client.get("/v1/vms/api-vm/files", params={"path": "relative"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "path"
    client.delete("/v1/vms/api-vm", headers=AUTH)


def test_token_in_no_log(manager: VmManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = create_app(manager, TOKEN, supervise=False)
    with TestClient(app) as c:
        c.get("/v1/vms", headers=AUTH)
        c.get("/v1/vms", headers={"Authorization": "Bearer wrong"})
        c.get("/v1/vms/nope", headers=AUTH)
    assert TOKEN not in caplog.text


def test_images_and_jobs(client: TestClient) -> None:
    assert client.get("/v1/images", headers=AUTH).json() == []
    assert client.post("/v1/images/prune", headers=AUTH).json() == {"removed": []}
    r = client.post("/v1/images/import", json={"path": "/nonexistent.qcow2", "name": "x"},
                    headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "path"
    r = client.post("/v1/images/pull", json={"url": "ftp://x", "name": "x"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "url"
    r = client.post("/v1/images/build", json={"kind": "golden"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "recipe"
    r = client.post("/v1/images/build", json={"kind": "golden", "recipe": {"name": "g"}},
                    headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "recipe.base"
    assert client.get("/v1/jobs", headers=AUTH).json() == []


# -- events
def test_event_ids_grow_and_resume() -> None:
    bus = EventBus(capacity=5)
    ids = [bus.publish("vm", "state", s, vm="a", state=s).id for s in
           ("created", "starting", "running")]
    assert ids == sorted(ids) and len(set(ids)) == 3
    after, gap = bus.since(ids[0])
    assert [e.state for e in after] == ["starting", "running"] and not gap
    for i in range(10):
        bus.publish("job", "progress", str(i))
    _, gap = bus.since(ids[0])
    assert gap  # older than the buffer


def test_sse_resume_with_last_event_id(client: TestClient) -> None:
    bus: EventBus = client.app.state.daemon.bus  # type: ignore[attr-defined]
    first = bus.publish("vm", "state", "created", vm="a", state="created")
    bus.publish("vm", "state", "starting", vm="a", state="starting")
    r = client.get("/v1/events", params={"follow": False},
                   headers={**AUTH, "Last-Event-ID": str(first.id)})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    ids = [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")]
    assert ids == [first.id + 1]
    r = client.get("/v1/events", params={"last_event_id": "x1"}, headers=AUTH)
    assert r.status_code == 422


# -- supervision helpers
def test_exit_reasons() -> None:
    assert exit_reason([]) is ExitReason.HYPERVISOR_DIED
    assert exit_reason([{"event": "SHUTDOWN", "data": {"guest": True,
                                                       "reason": "guest-shutdown"}}]) \
        is ExitReason.GUEST_SHUTDOWN
    assert exit_reason([{"event": "GUEST_PANICKED", "data": {}}]) is ExitReason.GUEST_PANIC
    assert exit_reason([{"event": "SHUTDOWN", "data": {"guest": False,
                                                       "reason": "host-qmp-quit"}}]) \
        is ExitReason.STOPPED
    assert exit_reason([{"event": "SHUTDOWN", "data": {"guest": False,
                                                       "reason": "host-signal"}}]) \
        is ExitReason.HYPERVISOR_DIED


def test_locks_held_reads_proc_locks(data: DataDir) -> None:
    from vmforge.node.lock import VmLock
    lock = VmLock(data.locks, "a")
    path = data.locks / "a.lock"
    assert locks_held([path]) == set()
    lock.acquire()
    try:
        assert locks_held([path]) == {path}
    finally:
        lock.release()
    assert locks_held([path]) == set()


@pytest.mark.subprocess
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """contrib/vmforge.service passes `systemd-analyze verify` (its ExecStart pointed at this
    checkout, as an install under /opt/vmforge would have it)."""
    import shutil
    import subprocess

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    root = Path(__file__).resolve().parents[2]
    unit = tmp_path / "vmforge.service"
    unit.write_text((root / "contrib/vmforge.service").read_text()
                    .replace("/opt/vmforge", str(root)))
    res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "KillMode=process" in unit.read_text()  # VMs outlive the daemon


# -- snapshots, clones, pools
SNAPSHOT_PATHS = ("/v1/snapshots", "/v1/snapshots/{ref}", "/v1/snapshots/{ref}/restore",
                  "/v1/vms/{name}/snapshots", "/v1/vms/{name}/clone", "/v1/pools",
                  "/v1/pools/{pool}", "/v1/pools/{pool}/take")


def test_openapi_lists_snapshots_clones_and_pools(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in SNAPSHOT_PATHS:
        assert p in paths, p
    assert {"get", "delete"} <= set(paths["/v1/snapshots/{ref}"])
    assert {"get", "post"} <= set(paths["/v1/pools"])
    assert {"get", "delete"} <= set(paths["/v1/pools/{pool}"])
    for p in ("/v1/vms/{name}/snapshots", "/v1/vms/{name}/clone",
              "/v1/snapshots/{ref}/restore", "/v1/pools"):
        responses = paths[p]["post"]["responses"]
        assert {"201", "202", "404", "409", "422"} <= set(responses), p
        assert "wait" in {q["name"] for q in paths[p]["post"]["parameters"]
                          if q["in"] == "query"}, p


def _add_snapshot(manager: VmManager, tmp_path: Path, name: str = "snap",
                  **meta: Any) -> Any:
    from vmforge.node import snapshots
    state = tmp_path / f"{name}.state"
    state.write_bytes(b"QEVM" + b"\0" * 60)
    recipe = {"format": snapshots.FORMAT, "source_vm": "src",
              "spec": {"memory_mib": 256, "kernel": {"kernel": str(state)},
                       "cloud_init": {"user_data": "#cloud-config\npassword: hunter2\n"}},
              "hypervisor_version": "7.2.0", "machine_type": "pc-q35-7.2", "accel": "tcg",
              "pins": {}, "disks": {}, **meta}
    return snapshots.Snapshot(manager.library.add(name, {"state": state}, kind="snapshot",
                                                  recipe=recipe))


def _nothing_made(data: DataDir, manager: VmManager, snapshots: int = 0) -> None:
    nothing_on_disk(data, manager)
    assert len([i for i in manager.library.all() if i.kind == "snapshot"]) == snapshots
    pools_dir = data.root / "pools"
    assert not pools_dir.exists() or list(pools_dir.iterdir()) == []


BAD_INPUT = [
    # (method, path, json body, status, field)
    ("POST", "/v1/vms/api-vm/snapshots", {"name": "a:1"}, 422, "name"),
    ("POST", "/v1/vms/api-vm/snapshots", {"name": "../x"}, 422, "name"),
    ("POST", "/v1/vms/api-vm/snapshots", {"stop": "maybe"}, 422, "stop"),
    ("POST", "/v1/vms/api-vm/snapshots", {"timeout": 0}, 422, "timeout"),
    ("POST", "/v1/vms/api-vm/snapshots", {"bogus": 1}, 422, "bogus"),
    ("POST", "/v1/vms/ghost/snapshots", {}, 404, None),
    ("POST", "/v1/vms/a_b/snapshots", {}, 422, "name"),
    ("POST", "/v1/vms/api-vm/clone", {}, 422, "name"),
    ("POST", "/v1/vms/api-vm/clone", {"name": "../x"}, 422, "name"),
    ("POST", "/v1/vms/api-vm/clone", {"name": "c1", "snapshot_name": "a/b"}, 422,
     "snapshot_name"),
    ("POST", "/v1/vms/ghost/clone", {"name": "c1"}, 404, None),
    ("POST", "/v1/snapshots/ghost/restore", {"name": "c1"}, 404, "ref"),
    ("POST", "/v1/snapshots/snap/restore", {"name": "x" * 64}, 422, "name"),
    ("POST", "/v1/snapshots/snap/restore", {}, 422, "name"),
    ("POST", "/v1/snapshots/snap/restore", {"name": "c1", "timeout": -1}, 422, "timeout"),
    ("POST", "/v1/snapshots/..%2Fx/restore", {"name": "c1"}, 404, None),
    ("GET", "/v1/snapshots/ghost", None, 404, "ref"),
    ("GET", "/v1/snapshots/a:b", None, 422, "ref"),
    ("DELETE", "/v1/snapshots/ghost:7", None, 404, "ref"),
    ("POST", "/v1/pools", {"name": "p", "size": 1}, 422, "spec"),
    ("POST", "/v1/pools", {"name": "p", "size": 1, "from_snapshot": "snap",
                           "spec": {"memory_mib": 256}}, 422, "spec"),
    ("POST", "/v1/pools", {"name": "p", "size": 65, "from_snapshot": "snap"}, 422, "size"),
    ("POST", "/v1/pools", {"name": "p", "size": -1, "from_snapshot": "snap"}, 422, "size"),
    ("POST", "/v1/pools", {"size": 1, "from_snapshot": "snap"}, 422, "name"),
    ("POST", "/v1/pools", {"name": "p_1", "size": 1, "from_snapshot": "snap"}, 422, "name"),
    ("POST", "/v1/pools", {"name": "p" * 51, "size": 1, "from_snapshot": "snap"}, 422,
     "name"),
    ("POST", "/v1/pools", {"name": "p", "size": 1, "from_snapshot": "ghost"}, 404,
     "from_snapshot"),
    ("POST", "/v1/pools", {"name": "p", "size": 1, "from_snapshot": "a b"}, 422,
     "from_snapshot"),
    ("POST", "/v1/pools", {"name": "p", "size": 1, "spec": {"memory_mib": -1}}, 422,
     "spec.memory_mib"),
    ("POST", "/v1/pools", {"name": "p", "size": 1, "spec": {"bogus": 1}}, 422, "spec.bogus"),
    ("POST", "/v1/pools", {"name": "p", "size": 1, "spec": {"disks": [
        {"id": "d", "size_gib": 1, "backing_file": "/nonexistent/base.qcow2"}]}}, 422,
     "spec.disks[0].backing_file"),
    ("GET", "/v1/pools/ghost", None, 404, None),
    ("GET", "/v1/pools/p_1", None, 422, "pool"),
    ("DELETE", "/v1/pools/ghost", None, 404, None),
    ("POST", "/v1/pools/ghost/take", {}, 404, None),
    ("POST", "/v1/pools/p/take", {"name": "../x"}, 422, "name"),
]


@pytest.mark.parametrize("method,path,body,status,field", BAD_INPUT,
                         ids=[f"{m} {p} {b}"[:70] for m, p, b, _s, _f in BAD_INPUT])
def test_snapshot_and_pool_routes_refuse_bad_input(
        client: TestClient, data: DataDir, manager: VmManager, tmp_path: Path, method: str,
        path: str, body: dict[str, Any] | None, status: int, field: str | None) -> None:
    """4xx naming the field, and nothing made: no VM, snapshot, pool or refiller."""
    r = client.post("/v1/vms", json=minimal_kernel_spec(tmp_path), params={"start": False},
                    headers=AUTH)
    assert r.status_code == 201
    _add_snapshot(manager, tmp_path)
    r = client.request(method, path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) >= {"error", "message", "status", "field", "hint"}
    if field is not None:
        assert err["field"] == field, err
    assert client.get("/v1/jobs", headers=AUTH).json() == []  # no job started either
    assert client.delete("/v1/vms/api-vm", headers=AUTH).status_code == 200
    _nothing_made(data, manager, snapshots=1)


def test_snapshot_of_a_vm_that_does_not_run(client: TestClient, data: DataDir,
                                            manager: VmManager, tmp_path: Path) -> None:
    """409 with wait=true; by default a job (202, Location) that fails the same way. Either
    way no snapshot."""
    client.post("/v1/vms", json=minimal_kernel_spec(tmp_path), params={"start": False},
                headers=AUTH)
    r = client.post("/v1/vms/api-vm/snapshots", json={"name": "s1"}, params={"wait": True},
                    headers=AUTH)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "InvalidState" and "is created" in r.json()["message"]
    r = client.post("/v1/vms/api-vm/snapshots", headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["kind"] == "vm.snapshot"
    import time
    deadline = time.monotonic() + 10
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
    assert job["state"] == "failed" and job["error"]["error"] == "InvalidState"
    r = client.post("/v1/vms/api-vm/clone", json={"name": "c1"}, params={"wait": True},
                    headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "InvalidState"
    assert client.get("/v1/vms/c1", headers=AUTH).status_code == 404
    client.delete("/v1/vms/api-vm", headers=AUTH)
    _nothing_made(data, manager)


def test_snapshot_ls_inspect_and_rm_refused_while_used(
        client: TestClient, data: DataDir, manager: VmManager, tmp_path: Path) -> None:
    snap = _add_snapshot(manager, tmp_path)
    rows = client.get("/v1/snapshots", headers=AUTH).json()
    assert [r["ref"] for r in rows] == ["snap:1"] and rows[0]["source_vm"] == "src"
    assert "hunter2" not in json.dumps(rows)
    one = client.get("/v1/snapshots/snap", headers=AUTH).json()
    assert one == rows[0] and one["users"] == [] and one["files"]["state"]["sha256"]
    assert "hunter2" in client.get("/v1/snapshots/snap:1", params={"show_secrets": True},
                                   headers=AUTH).text
    # a clone uses it: 409, and it stays
    client.post("/v1/vms", json=minimal_kernel_spec(tmp_path), params={"start": False},
                headers=AUTH)
    with manager.db.tx() as c:
        c.execute("INSERT INTO vm_images (vm_name, role, image_id) VALUES (?,?,?)",
                  ("api-vm", f"snapshot:{snap.image.id}", snap.image.id))
    assert client.get("/v1/snapshots/snap", headers=AUTH).json()["users"] == ["api-vm"]
    r = client.delete("/v1/snapshots/snap", headers=AUTH)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "ImageError" and "api-vm" in r.json()["message"]
    client.delete("/v1/vms/api-vm", headers=AUTH)
    # a pool uses it: 409 too (a pool being removed: no refiller is started for it)
    from vmforge.node import pools
    pools._save(manager, pools.Pool("warm", 1, snap.image.id, snap.ref, removing=True))
    pool = client.get("/v1/pools/warm", headers=AUTH).json()
    assert pool["snapshot_ref"] == "snap:1" and pool["ready"] == [] and pool["removing"]
    assert client.get("/v1/pools", headers=AUTH).json() == [pool]
    r = client.delete("/v1/snapshots/snap", headers=AUTH)
    assert r.status_code == 409 and "warm" in r.json()["message"]
    r = client.post("/v1/pools", json={"name": "warm", "size": 1, "from_snapshot": "snap"},
                    headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "VmExists"
    (data.root / "pools" / "warm.json").unlink()
    r = client.delete("/v1/snapshots/snap", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"ref": "snap:1", "removed": True}
    assert client.get("/v1/snapshots", headers=AUTH).json() == []


def test_restore_of_an_unrestorable_snapshot_leaves_nothing(
        client: TestClient, data: DataDir, manager: VmManager, tmp_path: Path) -> None:
    _add_snapshot(manager, tmp_path, "future", format=99)
    for wait in (True, False):
        r = client.post("/v1/snapshots/future/restore", json={"name": "c1"},
                        params={"wait": wait}, headers=AUTH)
        if not wait:
            assert r.status_code == 202
            import time
            job = r.json()
            while job["state"] == "running":
                time.sleep(0.05)
                job = client.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
            assert job["state"] == "failed" and job["error"]["error"] == "ImageError"
            assert "another version of vmforge" in job["error"]["message"]
        else:
            assert r.status_code == 422 and r.json()["error"] == "ImageError", r.text
            assert "another version of vmforge" in r.json()["message"]
    r = client.post("/v1/pools", json={"name": "p", "size": 1, "from_snapshot": "future"},
                    params={"wait": True}, headers=AUTH)
    assert r.status_code == 422 and "another version" in r.json()["message"]
    _nothing_made(data, manager, snapshots=1)


def test_pool_of_a_spec_that_cannot_be_snapshotted_is_refused_before_booting(
        client: TestClient, data: DataDir, manager: VmManager, tmp_path: Path) -> None:
    """The template would boot, then fail to snapshot: 422 at once, naming the field."""
    spec = minimal_kernel_spec(tmp_path)["spec"]
    (tmp_path / "share").mkdir()
    spec["mounts"] = [{"source": str(tmp_path / "share"), "target": "/mnt/share"}]
    for wait in (False, True):
        r = client.post("/v1/pools", json={"name": "p", "size": 1, "spec": spec},
                        params={"wait": wait}, headers=AUTH)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "spec.mounts[0]", r.json()
    assert client.get("/v1/jobs", headers=AUTH).json() == []
    _nothing_made(data, manager)
