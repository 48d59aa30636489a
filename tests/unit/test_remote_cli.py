"""The CLI against a daemon (vmforge.cli.remote), in-process: records and images come back
from the daemon's JSON with the attributes and ``as_dict`` of local ones; local-only commands,
an unreachable daemon and a refused token fail clearly with their exit codes; and `create`,
`ls`, `inspect`, `console`, `exec`, `rm` print the same through the daemon's API (FastAPI
TestClient, no sockets) as on the data directory itself. No processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.fakes import fake_host
from vmforge.api import create_app
from vmforge.api.models import ImageOut, VmOut
from vmforge.api.vms import vm_out
from vmforge.cli import fast
from vmforge.cli.main import app
from vmforge.cli.remote import (
    LocalOnly,
    RemoteManager,
    TokenRefused,
    image_from,
    local_only,
    record_from,
)
from vmforge.client import AsyncClient, Client, DaemonError
from vmforge.hypervisors.base import Accel, AgentEndpoint, Backend, EndpointKind, Runtime
from vmforge.images.library import Image
from vmforge.node.manager import VmManager, VmRecord
from vmforge.node.states import VmState
from vmforge.paths import DataDir
from vmforge.spec import parse_request

TOKEN = "remote-unit-token-3b9f0c1e7d2a4e6f"


# -------------------------------------------------------------------- records and images

def _record(state: VmState = VmState.RUNNING) -> VmRecord:
    req = parse_request({"name": "web-1", "spec": {
        "cpu_cores": 2, "memory_mib": 512, "kernel": {"image": "minimal"},
        "cloud_init": {"user_data": "#cloud-config\npassword: hunter2\n"},
        "nics": [{"id": "net0"}],
        "health_checks": [{"command": ["true"]}]}})
    stored = req.model_dump(mode="json", by_alias=True)
    running = state is VmState.RUNNING
    runtime = Runtime(Backend.QEMU, Accel.TCG, "/d/vms/web-1/qmp.sock",
                      AgentEndpoint(EndpointKind.UNIX, "/d/vms/web-1/agent.sock"),
                      pid=4242, marker="web-1") if running else None
    if state is VmState.BROKEN:
        return VmRecord("web-1", state, {}, Path("/d/vms/web-1"), Backend.QEMU, None, 1000.0,
                        None, None, None, "stored spec does not parse: x")
    return VmRecord("web-1", state, stored, Path("/d/vms/web-1"), Backend.QEMU, runtime,
                    1000.0, 1001.0, 1003.5 if running else None,
                    None if running else 1010.0, None, None if running else "stopped")


def _wire(data: dict[str, Any]) -> dict[str, Any]:
    """What the daemon sends for ``data`` (a VmOut response, as JSON)."""
    out: dict[str, Any] = json.loads(json.dumps(VmOut.model_validate(data).model_dump(
        mode="json")))
    return out


@pytest.mark.parametrize("state", [VmState.RUNNING, VmState.STOPPED, VmState.BROKEN])
def test_a_record_comes_back_as_it_went(state: VmState) -> None:
    local = _record(state)
    remote = record_from(_wire(vm_out(local)))
    assert isinstance(remote, VmRecord)
    assert remote.as_dict() == local.as_dict()
    for attr in ("name", "state", "backend", "accel", "pid", "boot_seconds", "created_at",
                 "started_at", "ready_at", "stopped_at", "last_error", "stop_reason",
                 "ipv4", "agent_endpoint", "agent_enabled", "runtime", "dir"):
        assert getattr(remote, attr) == getattr(local, attr), attr
    assert remote.paths.console == local.paths.console
    assert remote.host_nics() == local.host_nics()
    if state is VmState.BROKEN:
        assert remote.stored == {} and remote.request is None
    else:
        assert remote.req.spec.cpu_cores == 2
        assert remote.req.spec.health_checks == local.req.spec.health_checks
        assert remote.req.spec.agent.enabled


def test_secrets_are_redacted_unless_asked() -> None:
    local = _record()
    plain = record_from(_wire(vm_out(local)))
    assert "hunter2" not in json.dumps(plain.as_dict())
    full = record_from(_wire(vm_out(local, show_secrets=True)), secrets=True)
    assert full.as_dict(show_secrets=True) == local.as_dict(show_secrets=True)
    assert "hunter2" in json.dumps(full.as_dict(show_secrets=True))
    assert full.as_dict() == local.as_dict()  # redacted here as the daemon would


def test_describe_matches_the_local_one(tmp_path: Path) -> None:
    local = _record()
    m = VmManager(DataDir(tmp_path / "d").ensure(), host=fake_host())
    try:
        want = m.describe(local)
    finally:
        m.close()
    rm = RemoteManager("http://127.0.0.1:9")
    try:
        assert rm.describe(record_from(_wire(vm_out(local)))) == want
    finally:
        rm.close()


def test_an_image_comes_back_as_it_went() -> None:
    img = Image(3, "base", 2, "disk", "qcow2", {"disk": "ab" * 32}, None, 1, "file:x",
                None, 1234, 10 << 30, 99.5, {"disk": Path("/d/images/blobs/abab")})
    wire = json.loads(json.dumps(ImageOut.model_validate(img.as_dict()).model_dump(
        mode="json")))
    back = image_from(wire)
    assert back.as_dict() == img.as_dict()
    assert back.ref == "base:2" and back.files == img.files and back.size == 1234
    assert back.path("disk") is None  # the node's file: nothing here reads it


def test_a_daemon_that_speaks_otherwise_is_a_clear_error() -> None:
    with pytest.raises(DaemonError, match="does not understand"):
        record_from({"name": "x", "state": "levitating", "backend": "qemu", "dir": "/x",
                     "created_at": 1})


# -------------------------------------------------------------------- errors

LOCAL = [["plan", "-f", "spec.yaml"], ["image", "build", "minimal"],
         ["image", "pull", "http://x/y", "--name", "y"], ["image", "verify"],
         ["shell", "vm1"], ["timeline", "vm1"], ["doctor"], ["network", "ls"],
         ["launch", "minimal"]]


@pytest.mark.parametrize("argv", LOCAL, ids=lambda a: " ".join(a[:2]))
def test_local_only_commands_say_so(argv: list[str], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["--host", f"unix://{tmp_path}/none.sock", *argv])
    assert res.exit_code == 2, res.output
    assert "--host" in res.output and "Traceback" not in res.output


def test_seed_build_is_refused_and_writes_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ud = tmp_path / "ud.yaml"
    ud.write_text("#cloud-config\n")
    out = tmp_path / "seed.iso"
    res = CliRunner().invoke(app, ["-H", "unix:///nowhere.sock", "seed", "build", str(out),
                                   "--user-data", str(ud)])
    assert res.exit_code == 2 and "--host" in res.output and not out.exists()
    # the entry point's fast path honours VMFORGE_HOST too
    monkeypatch.setenv("VMFORGE_HOST", "unix:///nowhere.sock")
    assert fast.dispatch(["seed", "build", str(out), "--user-data", str(ud)]) == 2
    assert not out.exists()


def test_local_only_table() -> None:
    assert isinstance(local_only("image build golden"), LocalOnly)
    for command in ("ls", "exec", "image ls", "image inspect", "images", "seed validate"):
        assert local_only(command) is None, command


def test_an_unreachable_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    host = f"unix://{tmp_path}/none.sock"
    res = CliRunner().invoke(app, ["--host", host, "ls"])
    assert res.exit_code == 69 and "cannot reach the daemon" in res.output
    assert "Traceback" not in res.output
    monkeypatch.setenv("VMFORGE_HOST", host)
    assert fast.dispatch(["exec", "vm1", "--", "true"]) == 69
    assert fast.dispatch(["ls", "--json"]) == 69
    assert "is `vmforge serve` running?" in capsys.readouterr().err
    res = CliRunner().invoke(app, ["--host", "ftp://x", "ls"])
    assert res.exit_code == 1 and "unsupported daemon address" in res.output


def test_no_host_no_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFORGE_HOST", raising=False)
    m = fast._manager()
    try:
        assert isinstance(m, VmManager)
    finally:
        m.close()


def test_a_refused_token_never_shows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORGE_TOKEN", TOKEN)
    rm = RemoteManager("http://127.0.0.1:9")
    try:
        assert TOKEN not in repr(rm) and TOKEN not in repr(rm.client)
        with pytest.raises(TokenRefused) as info, rm.mapped():
            raise DaemonError("wrong bearer token", status=401, kind="Unauthorized")
    finally:
        rm.close()
    assert info.value.exit_code == 77 and "wrong token" in info.value.message
    assert TOKEN not in str(info.value) and "VMFORGE_TOKEN" in (info.value.hint or "")


# -------------------------------------------------------------------- through the API

@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data").ensure()


@pytest.fixture
def daemon(data: DataDir, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The daemon's app over ``data``; RemoteManager's clients routed to it in-process."""
    manager = VmManager(data, host=fake_host())
    api = create_app(manager, TOKEN, supervise=False, stream_limit=0.2)
    state: dict[str, Any] = {"token": TOKEN}
    with TestClient(api) as tc:
        def new_client(self: RemoteManager) -> Client:
            c = Client("http://testserver", token=state["token"])
            c.http.close()
            tc.headers.clear()
            tc.headers.update(c.headers)
            c.http = tc
            return c

        def aclient(self: RemoteManager) -> AsyncClient:
            c = AsyncClient("http://testserver", token=state["token"])
            c.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                       base_url="http://testserver", headers=c.headers)
            return c
        monkeypatch.setattr(RemoteManager, "_new_client", new_client)
        monkeypatch.setattr(RemoteManager, "_aclient", aclient)
        yield state
    manager.close()


def _spec(tmp_path: Path) -> Path:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"\x7fELF kernel")
    initrd.write_bytes(b"initrd")
    spec = tmp_path / "vm.yaml"
    spec.write_text("name: u1\nspec:\n  memory_mib: 256\n"
                    f"  kernel: {{kernel: {kernel}, initrd: {initrd}}}\n"
                    "  cloud_init: {user_data: \"#cloud-config\\npassword: hunter2\\n\"}\n")
    return spec


def _both(data: DataDir, argv: list[str]) -> tuple[Any, Any]:
    runner = CliRunner()
    return (runner.invoke(app, ["--data-dir", str(data.root), *argv]),
            runner.invoke(app, ["--host", "http://testserver", *argv]))


def test_the_same_commands_through_the_daemon(daemon: dict[str, Any], data: DataDir,
                                              tmp_path: Path) -> None:
    runner = CliRunner()
    remote = ["--host", "http://testserver"]
    res = runner.invoke(app, [*remote, "create", "-f", str(_spec(tmp_path)), "--json"])
    assert res.exit_code == 0, res.output
    created = json.loads(res.stdout)
    assert [v["name"] for v in created] == ["u1"] and "links" not in created[0]

    for argv in (["ls", "--json"], ["ls", "--json", "--show-secrets"],
                 ["inspect", "u1", "--json"], ["inspect", "u1", "--json", "--show-secrets"],
                 ["inspect", "u1"], ["console", "u1"], ["console", "u1", "-n", "2"]):
        here, there = _both(data, argv)
        assert (here.exit_code, here.stdout) == (there.exit_code, there.stdout), argv
    here, there = _both(data, ["ls"])
    assert [line.split()[:8] for line in here.stdout.splitlines()] == \
        [line.split()[:8] for line in there.stdout.splitlines()]
    assert "hunter2" not in runner.invoke(app, [*remote, "ls", "--json"]).stdout

    # the same errors and exit codes
    for argv in (["exec", "u1", "--", "true"], ["inspect", "ghost"], ["exec", "../x", "--",
                                                                      "true"],
                 ["stop", "ghost"], ["kill", "u1"], ["rm", "ghost"]):
        here, there = _both(data, argv)
        assert here.exit_code == there.exit_code, (argv, here.output, there.output)
        assert "Traceback" not in there.output
    res = runner.invoke(app, [*remote, "exec", "u1", "--", "true"])
    assert res.exit_code == 6 and "VM u1 is created, not running" in res.output
    assert "`vmforge start u1`" in res.output  # the daemon's hint, as a command
    res = runner.invoke(app, [*remote, "create", "-f", str(_spec(tmp_path))])
    assert res.exit_code == 5 and "already exists" in res.output

    daemon["token"] = "not-the-token"
    res = runner.invoke(app, [*remote, "ls"])
    assert res.exit_code == 77 and "wrong token" in res.output
    assert "not-the-token" not in res.output and TOKEN not in res.output
    daemon["token"] = TOKEN

    res = runner.invoke(app, [*remote, "rm", "u1"])
    assert res.exit_code == 0 and "removed u1" in res.stdout
    here = runner.invoke(app, ["--data-dir", str(data.root), "ls", "--json"])
    assert json.loads(here.stdout) == []


# -------------------------------------------------------------------- snapshots and pools

def _add_snapshot(data: DataDir, tmp_path: Path, name: str = "snap") -> None:
    from vmforge.node import snapshots
    state = tmp_path / f"{name}.state"
    state.write_bytes(b"QEVM" + b"\0" * 60)
    recipe = {"format": snapshots.FORMAT, "source_vm": "src",
              "spec": {"memory_mib": 256, "kernel": {"kernel": str(state)},
                       "cloud_init": {"user_data": "#cloud-config\npassword: hunter2\n"}},
              "hypervisor_version": "7.2.0", "machine_type": "pc-q35-7.2", "accel": "tcg",
              "pins": {}, "disks": {}, "paused_seconds": 0.25}
    m = VmManager(data, host=fake_host())
    try:
        m.library.add(name, {"state": state}, kind="snapshot", recipe=recipe)
    finally:
        m.close()


def test_snapshot_and_pool_commands_through_the_daemon(daemon: dict[str, Any], data: DataDir,
                                                       tmp_path: Path) -> None:
    """`snapshot ls/inspect/rm` and `pool ls` print the same through the daemon as on the
    data directory; no longer refused with --host."""
    for argv in (["snapshot", "ls", "--json"], ["pool", "ls", "--json"], ["snapshot", "ls"],
                 ["pool", "ls"]):
        here, there = _both(data, argv)
        assert (here.exit_code, here.stdout) == (there.exit_code, there.stdout), argv
        assert there.exit_code == 0, there.output
    _add_snapshot(data, tmp_path)
    m = VmManager(data, host=fake_host())
    try:
        from vmforge.node import pools
        snap = m.library.find("snap")
        assert snap is not None
        pools._save(m, pools.Pool("warm", 2, snap.id, snap.ref, removing=True))
    finally:
        m.close()
    for argv in (["snapshot", "ls", "--json"], ["snapshot", "inspect", "snap", "--json"],
                 ["snapshot", "inspect", "snap:1", "--json", "--show-secrets"],
                 ["snapshot", "inspect", "snap"], ["pool", "ls", "--json"], ["pool", "ls"]):
        here, there = _both(data, argv)
        assert (here.exit_code, here.stdout) == (there.exit_code, there.stdout), argv
        assert there.exit_code == 0, there.output
    here, there = _both(data, ["snapshot", "ls"])
    assert [line.split()[:7] for line in here.stdout.splitlines()] == \
        [line.split()[:7] for line in there.stdout.splitlines()]
    assert "snap:1" in there.stdout
    # in use by the pool: refused the same way
    here, there = _both(data, ["snapshot", "rm", "snap"])
    assert (here.exit_code, here.output) == (there.exit_code, there.output)
    assert there.exit_code == 1 and "in use by warm pool(s) warm" in there.output
    (data.root / "pools" / "warm.json").unlink()
    res = CliRunner().invoke(app, ["--host", "http://testserver", "snapshot", "rm", "snap"])
    assert res.exit_code == 0 and "removed snapshot snap:1" in res.stdout, res.output
    here = CliRunner().invoke(app, ["--data-dir", str(data.root), "snapshot", "ls", "--json"])
    assert json.loads(here.stdout) == []


REFUSED = [["snapshot", "inspect", "ghost"], ["snapshot", "inspect", "a::b"],
           ["snapshot", "rm", "ghost:3"], ["snapshot", "create", "ghost"],
           ["snapshot", "create", "u1", "--name", "a:1"], ["snapshot", "create", "u1"],
           ["clone", "ghost", "--name", "c1"], ["clone", "u1", "--name", "../x"],
           ["clone", "u1", "--name", "c1"], ["run", "--from-snapshot", "ghost", "--name", "c1"],
           ["run", "--from-snapshot", "ghost"], ["run", "--from-snapshot", "snap", "--name",
                                                 "a_b"],
           ["pool", "take", "ghost"], ["pool", "take", "ghost", "--name", "../x"],
           ["pool", "rm", "ghost"], ["pool", "create", "p", "--size", "1", "--from-snapshot",
                                     "ghost"],
           ["pool", "create", "p", "--size", "1"],
           ["pool", "create", "p", "--size", "99", "--from-snapshot", "snap"]]


def test_snapshot_and_pool_errors_are_the_same_through_the_daemon(
        daemon: dict[str, Any], data: DataDir, tmp_path: Path) -> None:
    """The same messages and exit codes as on the node; nothing is made by a refused
    command."""
    runner = CliRunner()
    res = runner.invoke(app, ["--host", "http://testserver", "create", "-f",
                              str(_spec(tmp_path))])
    assert res.exit_code == 0, res.output
    _add_snapshot(data, tmp_path)
    for argv in REFUSED:
        here, there = _both(data, argv)
        assert here.exit_code == there.exit_code != 0, (argv, here.output, there.output)
        assert "Traceback" not in there.output and "error:" in there.output, argv
        assert here.output == there.output, argv
    here = runner.invoke(app, ["--data-dir", str(data.root), "ls", "--json"])
    assert [v["name"] for v in json.loads(here.stdout)] == ["u1"]
    assert [r["ref"] for r in json.loads(runner.invoke(
        app, ["--data-dir", str(data.root), "snapshot", "ls", "--json"]).stdout)] == ["snap:1"]
    assert not (data.root / "pools").exists() or not list((data.root / "pools").iterdir())


def test_pool_create_from_a_spec_is_checked_by_the_daemon(daemon: dict[str, Any],
                                                          data: DataDir,
                                                          tmp_path: Path) -> None:
    """`pool create -f SPEC` sends the spec (paths on the node) and the daemon refuses one
    that cannot be snapshotted before booting anything."""
    spec = _spec(tmp_path)
    (tmp_path / "share").mkdir()
    spec.write_text(spec.read_text() + f"  mounts: [{{source: {tmp_path / 'share'}, "
                                       "target: /mnt/share}]\n")
    res = CliRunner().invoke(app, ["--host", "http://testserver", "pool", "create", "p",
                                   "--size", "1", "-f", str(spec)])
    assert res.exit_code == 2, res.output
    assert "spec.mounts[0]: a VM with host folders cannot be snapshotted" in res.output
    assert not (data.root / "pools").exists() or not list((data.root / "pools").iterdir())
    assert list(data.vms.iterdir()) == []
