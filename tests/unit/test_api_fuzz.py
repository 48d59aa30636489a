"""Schemathesis against the live OpenAPI document of a real uvicorn server (in a thread, on
127.0.0.1) over a manager with a stand-in hypervisor driver: every operation, bounded
examples; no 500, no response outside the documented statuses, content types and schemas.

No processes: the driver records a runtime and reports the guest gone, image builds and pulls
are stand-ins that fail like the real ones do without a network.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.fakes import fake_host
from vmforge import hypervisors
from vmforge.api import create_app
from vmforge.errors import BuildError, ImageError
from vmforge.hypervisors.base import (
    Accel,
    Backend,
    BackendStatus,
    Capabilities,
    Driver,
    Liveness,
    Rendered,
    Runtime,
    StopOutcome,
)
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

TOKEN = "fuzz-token-0a1b2c3d4e5f60718293"
MAX_EXAMPLES = int(os.environ.get("VMFORGE_FUZZ_EXAMPLES", "50"))


class StandInDriver(Driver):
    """Starts nothing: the VM is recorded as started, then found gone (crashed)."""
    backend = Backend.QEMU

    def capabilities(self) -> Capabilities:
        from vmforge.hypervisors.qemu.driver import QemuDriver
        return QemuDriver().capabilities()

    def render(self, plan: Any, host: Any) -> Rendered:
        return Rendered(argv=["stand-in"])

    def probe(self) -> BackendStatus:
        return BackendStatus(True, "stand-in")

    def start(self, plan: Any, host: Any, record: Callable[[Runtime], None]) -> Runtime:
        rt = Runtime(Backend.QEMU, Accel.TCG, "/nonexistent/qmp.sock", None)
        record(rt)
        return rt

    def find(self, name: str, vm_dir: Path) -> Runtime | None:
        return None

    def status(self, rt: Runtime) -> Liveness:
        return Liveness.CRASHED

    async def stop(self, rt: Runtime, timeout: float) -> StopOutcome:
        return StopOutcome.NOT_RUNNING

    def kill(self, rt: Runtime) -> StopOutcome:
        return StopOutcome.NOT_RUNNING

    def cleanup(self, rt: Runtime | None, name: str, vm_dir: Path) -> None:
        return None


def _no_network(*_a: Any, **_k: Any) -> Any:
    raise ImageError("download failed: no network in this test")


def _not_a_disk(*_a: Any, **_k: Any) -> Any:
    raise ImageError("unsupported format (this test does not run qemu-img)")


def _no_build(*_a: Any, **_k: Any) -> Any:
    raise BuildError("builders do not run in this test")


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mp = pytest.MonkeyPatch()
    driver = StandInDriver()
    for b in (Backend.QEMU, Backend.LIBVIRT):
        mp.setitem(hypervisors._cache, b, driver)
    mp.setattr("vmforge.images.fetch.pull", _no_network)
    mp.setattr("vmforge.builders.builtin.register_minimal", _no_build)
    mp.setattr("vmforge.builders.builtin.register_debian", _no_build)
    mp.setattr("vmforge.images.importing.import_disk", _not_a_disk)
    mp.setattr(VmManager, "ensure_images", lambda *_a, **_k: None)
    data = DataDir(tmp_path_factory.mktemp("fuzz")).ensure()
    manager = VmManager(data, host=fake_host())
    app = create_app(manager, TOKEN, stream_limit=0.3, reconcile_interval=0.5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        manager.close()
        mp.undo()


@schemathesis.check
def no_unexpected_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Any 5xx fails, except a 503 whose body is vmforge's HostError: the documented answer
    when this host cannot do what a (random) spec asks, e.g. ``accel: kvm`` on the TCG-only
    fake host, or a Cloud Hypervisor VM where its binary is absent."""
    if response.status_code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("error") == "HostError" and body.get("message"):
            return None
    return checks.not_a_server_error(ctx, response, case)  # type: ignore[no-any-return]


CHECKS = [no_unexpected_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance,
          checks.response_headers_conformance]


def test_api_fuzz(live_api: str) -> None:
    """Every operation of the live OpenAPI document, MAX_EXAMPLES cases each. (Driven by
    hand: schemathesis' pytest plugin does not run under pytest 9.)"""
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    failures: list[str] = []
    labels = []
    for result in schema.get_all_operations():
        op = result.ok()
        labels.append(op.label)

        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(base_url=live_api,
                                   headers={"Authorization": f"Bearer {TOKEN}"},
                                   checks=CHECKS, timeout=30)
        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported together
            failures.append(f"{op.label}: {exc}"[:3000])
    assert len(labels) >= 20, labels
    assert not failures, "\n\n".join(failures)
