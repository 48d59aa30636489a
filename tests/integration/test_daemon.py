"""A real `vmforge serve` process on a unix socket and on 127.0.0.1 (token), over the session's
data directory with the minimal image: create with ?wait=ready from a seed-002 style request,
exec streaming, 100 MiB files both ways, the event stream, adoption after SIGKILL of the
daemon, concurrent creates, tokens in no log. One VM boots at a time."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import free_port
from vmforge.client import Client
from vmforge.errors import SpecError
from vmforge.paths import DataDir

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(self, data: DataDir, tmp: Path) -> None:
        self.data = data
        self.port = free_port()
        self.token_file = tmp / "token"
        self.socket = tmp / "d.sock"
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.token_file.parent / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "VMFORGE_HOME": str(self.data.root)}
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmforge", "serve", "--socket", str(self.socket),
                 "--listen", f"127.0.0.1:{self.port}", "--token-file", str(self.token_file),
                 "--log-level", "debug"],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.unix() as c:
                    c.vms()
                return
            except Exception:  # noqa: BLE001 - not up yet
                assert self.proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def unix(self) -> Client:
        return Client(f"unix://{self.socket}", timeout=120)

    def tcp(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", token_file=self.token_file,
                      timeout=120)


@pytest.fixture(scope="module")
def daemon(vm_data: DataDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(vm_data, tmp_path_factory.mktemp("daemon"))
    d.start()
    made: list[str] = []
    d.made = made  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        try:
            if d.proc is None:
                d.start()
            with d.unix() as c:
                for name in made:
                    try:
                        c.delete(name, force=True, stop_timeout=0)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
        finally:
            d.stop()
            for log in d.logs:  # the token appears in no log
                assert d.token not in log.read_text(errors="replace")


def seed_request(name: str, backing: Path, memory: int = 512) -> dict[str, Any]:
    """The node-daemon request format (as seed-002 sends it), booting the minimal image."""
    return {"name": name, "spec": {
        "cpu_cores": 1, "memory_mib": memory, "firmware": "FIRMWARE_BIOS",
        "boot_order": ["BOOT_DEVICE_DISK"],
        "disks": [{"id": "data", "size_gib": 1, "backing_file": str(backing)}],
        "nics": [{"id": "net0", "mac": "52:54:00:12:34:56"}],
        "kernel": {"image": "minimal"},
        "cloud_init": {"user_data": "#cloud-config\nhostname: " + name + "\n",
                       "meta_data": f"instance-id: {name}\nlocal-hostname: {name}\n"}}}


@pytest.fixture(scope="module")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("backing") / "base.raw"
    with open(p, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    return p


def test_tcp_needs_the_token(daemon: Daemon) -> None:
    r = httpx.get(f"http://127.0.0.1:{daemon.port}/v1/vms")
    assert r.status_code == 401
    r = httpx.get(f"http://127.0.0.1:{daemon.port}/v1/vms",
                  headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401
    r = httpx.post(f"http://127.0.0.1:{daemon.port}/v1/vms", json={"name": "x", "spec": {}})
    assert r.status_code == 401
    assert not (daemon.data.vms / "x").exists()
    assert httpx.get(f"http://127.0.0.1:{daemon.port}/openapi.json").status_code == 200
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o600"
    assert oct(daemon.token_file.stat().st_mode & 0o777) == "0o600"


def test_vm_lifecycle_over_the_api(daemon: Daemon, backing: Path, tmp_path: Path) -> None:
    name = "api-life"
    daemon.made.append(name)  # type: ignore[attr-defined]
    events: list[dict[str, Any]] = []
    listening = threading.Event()

    def follow() -> None:
        with daemon.tcp() as c:
            listening.set()
            for ev in c.events(vm=name, limit=240):
                events.append(ev)
                if ev.get("state") == "ready":
                    return
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    listening.wait(10)
    time.sleep(0.3)
    with daemon.unix() as c:
        t0 = time.monotonic()
        vm = c.create(seed_request(name, backing), wait="ready", timeout=240)
        took = time.monotonic() - t0
        assert vm["state"] == "running" and vm["ready_at"], vm
        assert vm["links"]["events"] == f"/v1/events?vm={name}"
        print(f"POST /v1/vms?wait=ready: {took:.2f}s")
    t.join(30)
    states = [e["state"] for e in events if e.get("state")]
    assert states[:4] == ["created", "starting", "running", "ready"], events
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)

    with daemon.tcp() as c:
        # exec streams output before the command ends, and carries the exit code
        t0 = time.monotonic()
        seen: list[tuple[float, bytes]] = []
        res = c.exec(name, ["sh", "-c", "echo first; sleep 2; echo second >&2; exit 7"],
                     on_output=lambda s, b: seen.append((time.monotonic() - t0, b)))
        total = time.monotonic() - t0
        assert res.exit_code == 7 and res.stdout == b"first\n" and res.stderr == b"second\n"
        assert seen[0][0] < total - 1.5, (seen, total)
        lines = list(c.exec_lines(name, ["sh", "-c", "kill -9 $$"]))
        assert lines[-1]["signal"] == 9 and lines[-1]["exit_code"] is None
        assert c.exec(name, ["/nonexistent"]).exit_code == 127
        res = c.exec(name, ["cat"], stdin=b"\x00\x01binary", env={"A": "b"})
        assert res.stdout == b"\x00\x01binary"

        # 100 MiB up and down with the checksum
        big = tmp_path / "big.bin"
        with open(big, "wb") as f:
            for _ in range(100):
                f.write(os.urandom(1 << 20))
        want = hashlib.sha256(big.read_bytes()).hexdigest()
        t0 = time.monotonic()
        up = c.put_file(name, big, "/tmp/big.bin")
        t_up = time.monotonic() - t0
        assert up["sha256"] == want and up["size"] == 100 << 20
        t0 = time.monotonic()
        down = c.get_file(name, "/tmp/big.bin", tmp_path / "back.bin")
        t_down = time.monotonic() - t0
        assert down["sha256"] == want
        assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == want
        print(f"100 MiB up {t_up:.1f}s, down {t_down:.1f}s")
        r = c.http.put(f"/v1/vms/{name}/files", params={"path": "/tmp/x"}, content=b"abc",
                       headers={"X-Content-SHA256": "0" * 64})
        assert r.status_code == 422 and r.json()["field"] == "X-Content-SHA256"
        r = c.http.get(f"/v1/vms/{name}/files", params={"path": "/nonexistent"})
        assert r.status_code == 404, r.text

        health = c.health(name)
        assert health["agent"] == "ok"
        console = b"".join(c.console(name))
        assert b"vmforge: ready" in console

    # the WebSocket variant
    from websockets.sync.client import connect
    with connect(f"ws://127.0.0.1:{daemon.port}/v1/vms/{name}/exec/ws",
                 additional_headers={"Authorization": f"Bearer {daemon.token}"}) as ws:
        ws.send(json.dumps({"argv": ["sh", "-c", "echo ws; exit 4"]}))
        msgs = [json.loads(m) for m in ws]
    assert msgs[-1]["exit_code"] == 4 and any("stream" in m for m in msgs)

    with daemon.unix() as c:
        out = c.stop(name, timeout=30)
        assert out["vm"]["state"] == "stopped"
        c.delete(name)
        assert name not in [v["name"] for v in c.vms()]
    assert not (daemon.data.vms / name).exists()


def test_daemon_killed_and_restarted_adopts_running_vms(daemon: Daemon, backing: Path
                                                        ) -> None:
    name = "api-adopt"
    daemon.made.append(name)  # type: ignore[attr-defined]
    with daemon.unix() as c:
        vm = c.create(seed_request(name, backing, memory=256), wait="ready", timeout=240)
    pid = vm["pid"]
    daemon.stop(signal.SIGKILL)
    assert Path(f"/proc/{pid}").exists(), "the VM must outlive the daemon"
    daemon.start()
    with daemon.unix() as c:
        host = c.host_info()
        assert name in host["adopted"]
        deadline = time.monotonic() + 10
        while name not in c.host_info()["supervised"]:
            assert time.monotonic() < deadline, "the new daemon does not watch the VM"
            time.sleep(0.2)
        assert c.get(name)["pid"] == pid
        assert c.exec(name, ["true"]).exit_code == 0
        # the supervisor records why it stopped: the guest powered itself off
        c.exec(name, ["sh", "-c", "(sleep 0.5; poweroff -f) >/dev/null 2>&1 &"])
        deadline = time.monotonic() + 30
        while (rec := c.get(name))["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert rec["state"] == "stopped" and rec["stop_reason"] == "guest-shutdown", rec
        c.delete(name)


def test_concurrent_creates(daemon: Daemon, backing: Path) -> None:
    """8 creates at once (boot excluded: this machine boots one VM at a time in tests) and
    2 racing for one name: each succeeds or fails cleanly."""
    names = [f"api-conc-{i}" for i in range(8)]
    daemon.made.extend(names + ["api-race"])  # type: ignore[attr-defined]
    results: dict[str, Any] = {}

    def create(name: str, key: str) -> None:
        with daemon.unix() as c:
            try:
                results[key] = c.create(seed_request(name, backing), start=False)
            except Exception as exc:  # noqa: BLE001 - recorded and checked below
                results[key] = exc
    threads = [threading.Thread(target=create, args=(n, n)) for n in names]
    threads += [threading.Thread(target=create, args=("api-race", f"race-{i}"))
                for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for n in names:
        assert isinstance(results[n], dict) and results[n]["state"] == "created", results[n]
    race = [results["race-0"], results["race-1"]]
    assert sum(isinstance(r, dict) for r in race) == 1, race
    err = next(r for r in race if not isinstance(r, dict))
    assert type(err).__name__ == "VmExists"
    with daemon.unix() as c:
        listed = {v["name"]: v["state"] for v in c.vms()}
        for n in [*names, "api-race"]:
            assert listed[n] == "created"
            c.delete(n)
    for n in [*names, "api-race"]:
        assert not (daemon.data.vms / n).exists()


def test_spec_errors_over_tcp(daemon: Daemon) -> None:
    with daemon.tcp() as c:
        with pytest.raises(SpecError) as info:
            c.create({"name": "../x", "spec": {}})
        assert info.value.field == "name"
        with pytest.raises(SpecError) as info:
            c.create({"name": "bad", "spec": {"disks": [
                {"id": "d", "backing_file": "/nonexistent.qcow2"}]}})
        assert info.value.field == "spec.disks[0].backing_file"
    assert not (daemon.data.root.parent / "x").exists()
    assert not (daemon.data.vms / "bad").exists()


def test_cloud_image_seed002_request(daemon: Daemon, debian_image: str, vm_data: DataDir
                                     ) -> None:
    """The seed-002 request verbatim: a cloud image as the backing file, a cidata seed from
    cloud_init, BIOS, boot from disk; ready means the agent said hello and cloud-init is
    done; what the user-data asked for is there."""
    from vmforge.node.manager import VmManager

    m = VmManager(vm_data)
    try:
        disk = m.library.resolve(debian_image).path("disk")
    finally:
        m.close()
    assert disk is not None
    name = "web-server-01"
    daemon.made.append(name)  # type: ignore[attr-defined]
    mac = "52:54:00:12:34:56"
    req = {"name": name, "spec": {
        "cpu_cores": 2, "memory_mib": 1024, "firmware": "FIRMWARE_BIOS",
        "boot_order": ["BOOT_DEVICE_DISK"],
        "disks": [{"id": "boot", "size_gib": 4, "bootable": True,
                   "backing_file": str(disk)}],
        "cdroms": [],
        "nics": [{"id": "net0", "mac": mac}],
        "cloud_init": {
            "user_data": "#cloud-config\nhostname: web-server-01\nwrite_files:\n"
                         "  - path: /etc/from-seed-002\n    content: applied\n",
            "meta_data": "instance-id: web-server-01\nlocal-hostname: web-server-01\n",
            "network_config": "version: 2\nethernets:\n  eth0:\n"
                              f"    match: {{macaddress: '{mac}'}}\n    set-name: eth0\n"
                              "    dhcp4: true\n"}}}
    with daemon.tcp() as c:
        vm = c.create(req, wait="ready", timeout=600)
        assert vm["state"] == "running" and vm["last_error"] is None, vm
        res = c.exec(name, ["sh", "-c", "hostname; cat /etc/from-seed-002; echo; "
                                        "cloud-init status"], timeout=120)
        out = res.stdout.decode()
        assert res.exit_code == 0, (out, res.stderr)
        assert out.splitlines()[:2] == ["web-server-01", "applied"], out
        assert "status: done" in out
        c.delete(name, force=True, stop_timeout=0)
