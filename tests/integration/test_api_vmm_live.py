"""The minimal image boots for real under Cloud Hypervisor and Firecracker, to agent-ready over
hybrid vsock, then snapshot, restore and stop. What the stand-ins (tests/fakevmm.py) cannot
prove: that the real VMMs accept these requests and that the guest comes up.

Skipped unless the binary is on PATH and KVM really works (``/dev/kvm`` usable and a test
kernel boots under it: ``vmforge.hypervisors.host.probe_kvm``); runs wherever both hold.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmforge.agent.client import AgentClient
from vmforge.enums import Firmware, Machine
from vmforge.hypervisors._apivmm import ApiVmmDriver
from vmforge.hypervisors.base import Accel, Liveness, Runtime, StopOutcome
from vmforge.hypervisors.cloud_hypervisor.driver import CloudHypervisorDriver
from vmforge.hypervisors.firecracker.driver import FirecrackerDriver
from vmforge.hypervisors.host import HostFacts, probe_host
from vmforge.hypervisors.plan import AgentPlan, KernelPlan, MachinePlan
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir, VmPaths

pytestmark = pytest.mark.vm

DRIVERS: dict[str, type[ApiVmmDriver]] = {"cloud-hypervisor": CloudHypervisorDriver,
                                          "firecracker": FirecrackerDriver}


@pytest.fixture(params=sorted(DRIVERS))
def live(request: pytest.FixtureRequest) -> tuple[ApiVmmDriver, HostFacts, DataDir]:
    name = request.param
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not on PATH (a static binary from its GitHub releases)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip(f"/dev/kvm is missing or not usable: {name} runs on KVM only")
    data: DataDir = request.getfixturevalue("vm_data")  # builds the minimal image
    m = VmManager(data)
    img = m.library.find("minimal")
    assert img is not None and img.path("vmlinux") is not None
    host = probe_host(probe_kernel=str(img.path("vmlinux")), cache_dir=data.cache)
    m.close()
    if not host.kvm.works:
        pytest.skip(f"KVM does not boot guests here: {host.kvm.reason}")
    return DRIVERS[name](), host, data


@pytest.fixture
def vm_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "vm"
    d.mkdir(mode=0o700)
    yield d


def minimal_plan(data: DataDir, vm_dir: Path) -> MachinePlan:
    m = VmManager(data)
    img = m.library.find("minimal")
    m.close()
    assert img is not None
    paths = VmPaths(vm_dir)
    initrd = img.path("initrd")
    return MachinePlan(
        name="live1", vm_dir=str(vm_dir), run_dir=str(paths.sockets), cpu_cores=1,
        memory_mib=256, machine=Machine.MICROVM, firmware=Firmware.BIOS, accel=Accel.KVM,
        console_log=str(paths.console),
        kernel=KernelPlan(str(img.path("vmlinux")), str(initrd) if initrd else None,
                          f"{img.cmdline or 'console=ttyS0'} vmforge.id=live1"),
        agent=AgentPlan("vsock", cid=3))


async def ready(rt: Runtime, timeout: float = 60) -> bytes:
    assert rt.agent is not None
    async with AgentClient(str(rt.agent)) as c:
        await c.wait_ready(timeout)
        return (await c.exec(["uname", "-r"], timeout=10)).stdout


def test_minimal_image_to_agent_ready_snapshot_restore_stop(
        live: tuple[ApiVmmDriver, HostFacts, DataDir], vm_dir: Path) -> None:
    drv, host, data = live
    plan = minimal_plan(data, vm_dir)
    rt = drv.start(plan, host, lambda _r: None)
    try:
        assert drv.status(rt) is Liveness.RUNNING
        assert asyncio.run(ready(rt)).strip()
        snap = vm_dir / "snapshots" / "s1"
        drv.snapshot_dir(rt, snap)
        drv.kill(rt)
        drv.cleanup(rt, plan.name, vm_dir)
        rt = drv.restore_dir(plan, host, lambda _r: None, snap)
        assert drv.status(rt) is Liveness.RUNNING
        assert asyncio.run(ready(rt, 30)).strip()
        outcome = asyncio.run(drv.stop(rt, 30))
        assert outcome in (StopOutcome.ACPI, StopOutcome.QUIT), outcome
    finally:
        found = drv.find(plan.name, vm_dir)
        if found is not None:
            drv.kill(found)
        drv.cleanup(rt, plan.name, vm_dir)
    assert not list(Path(plan.run_dir).glob("*.sock"))


def test_snapshot_clone_exec_through_the_manager(
        live: tuple[ApiVmmDriver, HostFacts, DataDir]) -> None:
    """`snapshot create`, a clone by restore and exec in it, on the real VMM (the stand-in
    version of this is tests/unit/test_api_vmm_snapshots.py)."""
    from vmforge.node import restore, snapshots
    from vmforge.spec import parse_request
    drv, _host, data = live
    m = VmManager(data)
    backend = drv.backend.value
    names = (f"live-{backend[:2]}-src", f"live-{backend[:2]}-clone")
    try:
        asyncio.run(m.run(parse_request({"name": names[0], "spec": {
            "hypervisor": backend, "machine": "microvm", "memory_mib": 256,
            "kernel": {"image": "minimal"}, "nics": []}}), timeout=60))
        snap = snapshots.create(m, names[0], f"{names[0]}-snap")
        assert m.get(names[0]).state.value == "running"
        clone = asyncio.run(restore.restore(m, snap.ref, names[1], timeout=60))
        assert clone.state.value == "running"

        async def hostname(name: str) -> bytes:
            async with m.agent(name) as c:
                return (await c.exec(["hostname"], timeout=10)).stdout
        assert asyncio.run(hostname(names[1])).strip() == names[1].encode()
        for n in names:
            asyncio.run(m.delete(n, force=True))
        snapshots.remove(m, snap.ref)
    finally:
        for n in names:
            if m._row(n) is not None:
                asyncio.run(m.delete(n, force=True, stop_timeout=0))
        m.close()
