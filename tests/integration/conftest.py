"""Fixtures for tests that boot real QEMU guests (under TCG on machines without working KVM).

The minimal image is built once per session (the build cache makes later sessions instant);
every VM a test starts is killed by PID and deleted at teardown, even when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmforge.agent.client import AgentClient
from vmforge.builders.builtin import register_minimal
from vmforge.errors import VmNotFound
from vmforge.hypervisors.libvirt.driver import is_system
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import VmRequest, parse_request

T = TypeVar("T")


@pytest.fixture(scope="session")
def vm_data(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    data = DataDir(tmp_path_factory.mktemp("vmdata")).ensure()
    m = VmManager(data)
    register_minimal(m.library, data.cache)
    m.close()
    return data


class VmHelper:
    def __init__(self, data: DataDir) -> None:
        self.manager = VmManager(data)
        self.names: list[str] = []

    def request(self, name: str, **spec: Any) -> VmRequest:
        spec.setdefault("kernel", {"image": "minimal"})
        spec.setdefault("memory_mib", 256)
        return parse_request({"name": name, "spec": spec})

    def run(self, name: str, **spec: Any) -> Any:
        self.names.append(name)
        return asyncio.run(self.manager.run(self.request(name, **spec), timeout=240))

    def agent(self, name: str) -> AgentClient:
        return AgentClient(self.manager.get(name).agent_endpoint)

    def call(self, name: str, fn: Callable[[AgentClient], Awaitable[T]]) -> T:
        async def go() -> T:
            async with self.agent(name) as c:
                return await fn(c)
        return asyncio.run(go())

    def cleanup(self) -> None:
        """Remove every VM the test made; ``delete`` kills its hypervisor process by the
        recorded handle, checked against PID reuse, and whatever ``find`` sees for it."""
        for name in self.names:
            try:
                asyncio.run(self.manager.delete(name, force=True, stop_timeout=0))
            except VmNotFound:
                continue
        self.manager.close()


@pytest.fixture
def vms(vm_data: DataDir) -> Iterator[VmHelper]:
    helper = VmHelper(vm_data)
    try:
        yield helper
    finally:
        helper.cleanup()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def debian_image(vm_data: DataDir) -> str:
    """The Debian cloud image, built once per recipe (cached outside the repo)."""
    from vmforge.builders.builtin import register_debian

    m = VmManager(vm_data)
    try:
        img = register_debian(m.library, vm_data.cache, "debian")
        return str(img.ref)
    finally:
        m.close()


def ssh_keypair(tmp: Path) -> tuple[Path, str]:
    import subprocess
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, (tmp / "id_ed25519.pub").read_text().strip()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- libvirtd

RUN = Path("/run")


def _answers(uri: str) -> bool:
    import libvirt
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _start_daemon(name: str, pidfile: Path) -> int:
    pidfile.unlink(missing_ok=True)
    subprocess.run([name, "-d", "-p", str(pidfile)], check=True, timeout=60)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"{name} -d wrote no pid file {pidfile}")


def _stop_daemon(name: str, pid: int) -> None:
    """SIGTERM, then SIGKILL, this pid only, and only while it is still that daemon."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if _comm(pid) != name[:15]:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _comm(pid) == name[:15]:
            time.sleep(0.05)


@pytest.fixture(scope="session")
def libvirt_uri() -> Iterator[str]:
    pytest.importorskip("libvirt", reason="libvirt-python is not installed "
                                          "(bash scripts/install-deps.sh)")
    uri = os.environ.get("VMFORGE_LIBVIRT_URI", "qemu:///system")
    if _answers(uri):
        yield uri
        return
    if not is_system(uri) or os.geteuid() != 0:
        pytest.skip(f"libvirt does not answer at {uri}, and only root can start the system "
                    "daemon here")
    for tool in ("virtlogd", "libvirtd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install libvirt-daemon-system)")
    started: list[tuple[str, int, Path]] = []
    try:
        for name in ("virtlogd", "libvirtd"):
            if name == "virtlogd" and Path("/run/libvirt/virtlogd-sock").is_socket() and \
                    subprocess.run(["virt-admin", "-c", "virtlogd:///system", "version"],
                                   capture_output=True).returncode == 0:
                continue  # one runs already (not ours to stop)
            pidfile = RUN / f"vmforge-test-{name}.pid"
            started.append((name, _start_daemon(name, pidfile), pidfile))
        deadline = time.monotonic() + 30
        while not _answers(uri):
            assert time.monotonic() < deadline, "libvirtd started but does not answer"
            time.sleep(0.1)
        yield uri
    finally:
        for name, pid, pidfile in reversed(started):
            _stop_daemon(name, pid)
            pidfile.unlink(missing_ok=True)
