"""Cloud Hypervisor and Firecracker drivers, the I/O part, against stand-ins (tests/fakevmm.py):
processes started through the drivers exactly as the real binaries would be (detached, with
their API socket), that serve the VMM's API, validate every request against the VMM's own
document and refuse what the VMM refuses. Neither binary runs here and nothing boots: what only
a real VMM can prove is in tests/integration/test_api_vmm_live.py.

Checked: start sends the rendered requests in order with valid bodies; status; find (pidfile,
and the process table when the pidfile is lost); the agent over hybrid vsock (a real guest
agent behind the stand-in's vsock socket); stop (power button, then quit, then kill); a refused
start leaves no process and no files; snapshot and restore; cleanup leaves nothing.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from vmforge import run
from vmforge.agent import guest
from vmforge.agent.client import AgentClient
from vmforge.enums import Firmware, Machine
from vmforge.errors import HostError, LaunchError, VmError
from vmforge.hypervisors._apivmm import ApiVmmDriver
from vmforge.hypervisors._unixhttp import UnixHTTPConnection, call
from vmforge.hypervisors.base import (
    Accel,
    ApiRequest,
    EndpointKind,
    Liveness,
    Runtime,
    StopOutcome,
)
from vmforge.hypervisors.cloud_hypervisor.driver import CloudHypervisorDriver
from vmforge.hypervisors.firecracker.driver import FirecrackerDriver
from vmforge.hypervisors.plan import AgentPlan, DiskPlan, KernelPlan, MachinePlan
from vmforge.hypervisors.qemu.driver import pid_alive
from vmforge.paths import VmPaths

from ..fakes import fake_host
from ..fakevmm import read_journal, write_shim
from ..oracle import Oracle

DRIVERS: dict[str, type[ApiVmmDriver]] = {"cloud-hypervisor": CloudHypervisorDriver,
                                          "firecracker": FirecrackerDriver}
HOST = fake_host()


@dataclass
class Rig:
    backend: str
    drv: ApiVmmDriver
    plan: MachinePlan
    journal: Path
    vm_dir: Path
    recorded: list[Runtime]

    def requests(self) -> list[dict[str, Any]]:
        """What the stand-in received, without the driver's liveness polls (GETs)."""
        return [e for e in read_journal(self.journal) if e["method"] != "GET"]

    def leftovers(self) -> list[str]:
        run_dir = Path(self.plan.run_dir)
        socks = [p.name for p in run_dir.iterdir() if p.is_socket()] if run_dir.exists() else []
        pid = [p.name for p in self.vm_dir.glob("*.pid*")]
        return socks + pid


def make_rig(tmp_path: Path, backend: str, options: dict[str, Any] | None = None,
             **changes: Any) -> Rig:
    vm_dir = tmp_path / "vms" / "vm1"
    vm_dir.mkdir(parents=True, mode=0o700)
    paths = VmPaths(vm_dir)
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"\x7fELF stand-in kernel")
    initrd.write_bytes(b"070701 stand-in initrd")
    disk = vm_dir / "disk-root.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    seed = paths.seed
    seed.write_bytes(b"CD001 stand-in seed")
    plan = MachinePlan(
        name="vm1", vm_dir=str(vm_dir), run_dir=str(paths.sockets), cpu_cores=2,
        memory_mib=256, machine=Machine.MICROVM, firmware=Firmware.BIOS, accel=Accel.KVM,
        console_log=str(paths.console), disks=(DiskPlan("root", str(disk), "raw"),),
        seed=str(seed), kernel=KernelPlan(str(kernel), str(initrd), "console=ttyS0"),
        agent=AgentPlan("vsock", cid=3))
    plan = replace(plan, **changes)
    journal = tmp_path / "journal.jsonl"
    shim = write_shim(tmp_path / "bin", backend, journal=journal, options=options)
    return Rig(backend, DRIVERS[backend](binary=str(shim)), plan, journal, vm_dir, [])


@pytest.fixture(params=sorted(DRIVERS))
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path, request.param)
    yield r
    found = r.drv.find("vm1", r.vm_dir)  # a failed test leaves no stand-in running
    if found is not None:
        r.drv.kill(found)


def start(r: Rig) -> Runtime:
    return r.drv.start(r.plan, HOST, r.recorded.append)


async def agent_hello(rt: Runtime) -> tuple[dict[str, Any], bytes]:
    assert rt.agent is not None
    async with AgentClient(str(rt.agent)) as c:
        hello = await c.wait_ready(10)
        await c.ping()
        res = await c.exec(["echo", "over hybrid vsock"], timeout=10)
        return hello, res.stdout


@pytest.mark.subprocess
def test_start_status_agent_stop_cleanup(rig: Rig) -> None:
    rt = start(rig)
    # recorded before the process existed (no pid), then with its pid
    assert [x.pid for x in rig.recorded] == [None, rt.pid]
    assert rig.recorded[0].control == rt.control == rt.marker
    assert rig.drv.pidfile(rig.vm_dir).read_text().strip() == str(rt.pid)
    assert rt.accel is Accel.KVM and rt.backend is rig.drv.backend
    assert rt.agent is not None and rt.agent.kind is EndpointKind.HYBRID_VSOCK
    # the rendered requests arrived in order, each accepted and valid
    rendered = rig.drv.render(rig.plan, HOST).requests or []
    got = rig.requests()
    assert [(e["method"], e["path"], e["body"]) for e in got] == \
        [(r.method, r.path, r.body) for r in rendered]
    assert all(200 <= e["status"] < 300 for e in got)
    oracle = Oracle(rig.backend)
    for e in got:
        oracle.check(e["method"], e["path"], e["body"])
    assert rig.drv.status(rt) is Liveness.RUNNING
    found = rig.drv.find("vm1", rig.vm_dir)
    assert found is not None and (found.pid, found.control, found.agent) == \
        (rt.pid, rt.control, rt.agent)
    # the agent: CONNECT 1024 on the VMM's vsock socket, then the agent protocol
    hello, out = asyncio.run(agent_hello(rt))
    assert hello["agent_version"] == guest.VERSION and out == b"over hybrid vsock\n"
    # stop: the power button is enough (the guest powers off, the VMM exits)
    assert asyncio.run(rig.drv.stop(rt, 10)) is StopOutcome.ACPI
    assert rig.requests()[-1]["path"] in ("/api/v1/vm.power-button", "/actions")
    assert not pid_alive(rt.pid, rt.marker)
    assert rig.drv.status(rt) is Liveness.POWERED_OFF
    assert asyncio.run(rig.drv.stop(rt, 10)) is StopOutcome.NOT_RUNNING
    assert rig.drv.find("vm1", rig.vm_dir) is None
    rig.drv.cleanup(rt, "vm1", rig.vm_dir)
    assert rig.leftovers() == []


@pytest.mark.subprocess
@pytest.mark.parametrize("backend", sorted(DRIVERS))
def test_a_guest_that_ignores_the_power_button_is_quit(tmp_path: Path, backend: str) -> None:
    r = make_rig(tmp_path, backend, options={"ignore_power_button": True})
    rt = start(r)
    assert asyncio.run(r.drv.stop(rt, 0.5)) is StopOutcome.QUIT
    paths = [e["path"] for e in r.requests()]
    if backend == "cloud-hypervisor":
        assert paths[-3:] == ["/api/v1/vm.power-button", "/api/v1/vm.shutdown",
                              "/api/v1/vmm.shutdown"]
    else:  # no shutdown call in Firecracker's API: SIGTERM
        assert r.requests()[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert not pid_alive(rt.pid, rt.marker)
    r.drv.cleanup(rt, "vm1", r.vm_dir)
    assert r.leftovers() == []


@pytest.mark.subprocess
def test_kill_and_crash(rig: Rig) -> None:
    rt = start(rig)
    assert rig.drv.kill(rt) is StopOutcome.KILLED
    assert rig.drv.status(rt) is Liveness.CRASHED  # gone without powering off
    assert rig.drv.kill(rt) is StopOutcome.NOT_RUNNING
    assert asyncio.run(rig.drv.stop(rt, 0)) is StopOutcome.NOT_RUNNING
    rig.drv.cleanup(rt, "vm1", rig.vm_dir)
    assert rig.leftovers() == []


@pytest.mark.subprocess
def test_find_without_the_pidfile(rig: Rig) -> None:
    """vmforge died between the spawn and the pidfile: the process table still tells."""
    rt = start(rig)
    rig.drv.pidfile(rig.vm_dir).unlink()
    found = rig.drv.find("vm1", rig.vm_dir)
    assert found is not None and found.pid == rt.pid
    rig.drv.pidfile(rig.vm_dir).write_text(f"{os.getpid()}\n")  # a stale pid: not trusted
    found = rig.drv.find("vm1", rig.vm_dir)
    assert found is not None and found.pid == rt.pid
    assert asyncio.run(rig.drv.stop(found, 10)) is StopOutcome.ACPI


@pytest.mark.subprocess
def test_a_refused_start_leaves_no_process_and_no_files(rig: Rig) -> None:
    bad = replace(rig.plan, kernel=KernelPlan(str(rig.vm_dir / "no-such-vmlinux"), None, ""))
    with pytest.raises(LaunchError) as info:
        rig.drv.start(bad, HOST, rig.recorded.append)
    assert "no-such-vmlinux" in str(info.value) and "refused PUT" in str(info.value)
    pid = rig.recorded[-1].pid
    assert pid is not None and not pid_alive(pid, None)
    assert rig.drv.find("vm1", rig.vm_dir) is None
    assert rig.leftovers() == []


@pytest.mark.subprocess
@pytest.mark.parametrize("backend", sorted(DRIVERS))
def test_a_vmm_that_exits_at_start_is_a_launch_error(tmp_path: Path, backend: str) -> None:
    r = make_rig(tmp_path, backend, options={"fail_at_start": True})
    with pytest.raises(LaunchError, match="exited as it started: Error: .* told to fail"):
        start(r)
    assert r.leftovers() == [] and r.drv.find("vm1", r.vm_dir) is None


@pytest.mark.subprocess
def test_stale_sockets_of_a_previous_run_are_replaced(rig: Rig) -> None:
    run_dir = Path(rig.plan.run_dir)
    for path in (rig.drv.api_socket(str(run_dir)), rig.drv.vsock_socket(str(run_dir))):
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()  # the file stays: what a VMM killed with SIGKILL leaves
    rt = start(rig)
    assert rig.drv.status(rt) is Liveness.RUNNING
    assert asyncio.run(agent_hello(rt))[1] == b"over hybrid vsock\n"
    rig.drv.kill(rt)


@pytest.mark.subprocess
def test_the_stand_in_refuses_what_the_vmm_refuses(rig: Rig) -> None:
    """The contract server is strict: wrong state, unknown field, unknown path."""
    rt = start(rig)
    api = rt.control
    if rig.backend == "cloud-hypervisor":
        assert call(api, "PUT", "/api/v1/vm.boot").status == 405  # booted already
        assert call(api, "PUT", "/api/v1/vm.create", {"payload": {"kernel": "/k"}}).status \
            == 500  # created already
        assert call(api, "PUT", "/api/v1/vm.snapshot",
                    {"destination_url": "file:///tmp"}).status == 405  # not paused
        assert call(api, "PUT", "/api/v1/vm.resize", {"desired_vcpus": 2,
                                                      "bogus": 1}).status == 400
        assert call(api, "GET", "/api/v1/no.such").status == 404
    else:
        late = call(api, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        assert late.status == 400 and "after starting" in late.message
        assert call(api, "PUT", "/snapshot/create", {"snapshot_path": "/tmp/s",
                                                     "mem_file_path": "/tmp/m"}).status == 400
        assert "Invalid request" in call(api, "GET", "/no/such").message
        assert call(api, "PUT", "/actions", {"action_type": "InstanceStart",
                                             "extra": 1}).status == 400
    rig.drv.kill(rt)


@pytest.mark.subprocess
def test_snapshot_and_restore(rig: Rig, tmp_path: Path) -> None:
    rt = start(rig)
    snap = tmp_path / "snapshots" / "s1"
    rig.drv.snapshot_dir(rt, snap)
    assert rig.drv.status(rt) is Liveness.RUNNING  # resumed
    assert any(snap.iterdir())
    rig.drv.kill(rt)
    rig.drv.cleanup(rt, "vm1", rig.vm_dir)
    rig.journal.unlink()
    rt2 = rig.drv.restore_dir(rig.plan, HOST, rig.recorded.append, snap)
    got = [(e["method"], e["path"]) for e in rig.requests()]
    want = [(r.method, r.path) for r in rig.drv.restore_requests(rig.plan, str(snap))]
    assert got == want and all(200 <= e["status"] < 300 for e in rig.requests())
    assert rig.drv.status(rt2) is Liveness.RUNNING
    assert asyncio.run(agent_hello(rt2))[1] == b"over hybrid vsock\n"  # vsock came back
    # a snapshot the VMM refuses: the error names the call, and the VM is resumed
    good = rig.drv.snapshot_requests(str(snap))
    bad = [good[0], ApiRequest(good[1].method, good[1].path, {"bogus": 1}), good[-1]]
    rig.drv.snapshot_requests = lambda _d, resume=True: bad  # type: ignore[method-assign]
    with pytest.raises(VmError, match=r"refused PUT .*\(snapshot\): HTTP 400"):
        rig.drv.snapshot_dir(rt2, tmp_path / "snapshots" / "s2")
    assert rig.drv.status(rt2) is Liveness.RUNNING
    assert asyncio.run(rig.drv.stop(rt2, 10)) is StopOutcome.ACPI
    rig.drv.cleanup(rt2, "vm1", rig.vm_dir)
    assert rig.leftovers() == []


@pytest.mark.subprocess
def test_tcg_is_refused_before_anything_runs(rig: Rig) -> None:
    with pytest.raises(HostError, match="runs on KVM only"):
        rig.drv.start(replace(rig.plan, accel=Accel.TCG), HOST, rig.recorded.append)
    assert rig.recorded == [] and not rig.journal.exists()


def test_probe_without_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "find_binary", lambda _name: None)
    for cls in DRIVERS.values():
        st = cls().probe()
        assert not st.available and "not found" in st.detail and st.hint
        with pytest.raises(HostError, match="not found"):
            cls().binary()


def test_spawn_detached_is_a_guarded_process_start(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="unit test tried to run"):
        run.spawn_detached(["true"], log=tmp_path / "log", pidfile=tmp_path / "pid")
    assert not (tmp_path / "pid").exists()


@pytest.mark.subprocess
def test_spawn_detached_writes_the_pidfile_and_reaps(tmp_path: Path) -> None:
    import sys
    import time
    pidfile, log = tmp_path / "p.pid", tmp_path / "p.out"
    code = ("import os, sys, time; print('out', os.getsid(0) == os.getpid()); "
            "sys.stdout.flush(); time.sleep(30)")
    pid = run.spawn_detached([sys.executable, "-c", code], log=log, pidfile=pidfile)
    assert pidfile.read_text().strip() == str(pid) and pid_alive(pid)
    deadline = time.monotonic() + 10
    while "out" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.read_text().strip() == "out True"  # its own session
    assert log.stat().st_mode & 0o777 == 0o600
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()  # reaped by the daemon thread, not a zombie


def test_unix_http_connection_speaks_http(tmp_path: Path) -> None:
    """The stdlib client against a minimal HTTP server on a unix socket (in-process)."""
    import threading
    path = str(tmp_path / "api.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int([h for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(body) < length:
                body += conn.recv(4096)
            reply = json.dumps({"fault_message": "echo " + body.decode()}).encode()
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: "
                         + str(len(reply)).encode() + b"\r\n\r\n" + reply)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    resp = call(path, "PUT", "/x", {"a": 1})
    t.join(5)
    srv.close()
    assert resp.status == 400 and not resp.ok and resp.message == 'echo {"a": 1}'
    with pytest.raises(OSError):
        call(str(tmp_path / "absent.sock"), "GET", "/")
    assert isinstance(UnixHTTPConnection("/x"), http.client.HTTPConnection)
