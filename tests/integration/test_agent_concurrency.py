"""Many `vmforge exec` processes on one VM whose agent channel is virtio-serial.

QEMU's chardev socket takes one host connection at a time; before the channel lock, 50
concurrent `vmforge exec` processes got 46 raw ConnectionResetErrors. Now they queue on the
lock beside the socket and all succeed, or fail after a clear bound with "agent busy".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]


def cli_env(vms: VmHelper, **extra: str) -> dict[str, str]:
    env = dict(os.environ, VMFORGE_HOME=str(vms.manager.data.root), NO_COLOR="1",
               COLUMNS="200")
    env.pop("VMFORGE_AGENT_QUEUE_TIMEOUT", None)
    env.update(extra)
    return env


def vmforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmforge", *args]


def test_64_concurrent_exec_processes_all_succeed(vms: VmHelper, tmp_path: Path) -> None:
    vms.run("crowd")
    env = cli_env(vms)
    n = 64
    t0 = time.monotonic()
    procs = [subprocess.Popen(vmforge("exec", "crowd", "--", "echo", str(i)), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
             for i in range(n)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    elapsed = time.monotonic() - t0
    failed = [(i, rc, err.decode()[-500:]) for i, (rc, _out, err) in enumerate(results)
              if rc != 0]
    assert failed == [], f"{len(failed)} of {n} failed; first: {failed[:3]}"
    assert [out for _rc, out, _err in results] == [f"{i}\n".encode() for i in range(n)]
    print(f"{n} concurrent `vmforge exec` on one VM: all ok in {elapsed:.2f}s")


def test_a_held_channel_fails_after_the_bound_with_a_clear_message(vms: VmHelper) -> None:
    vms.run("held")
    holder = subprocess.Popen(vmforge("exec", "held", "--", "sh", "-c", "echo in; sleep 60"),
                              env=cli_env(vms), stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"in\n"  # it holds the channel now
        t0 = time.monotonic()
        waiter = subprocess.run(vmforge("exec", "held", "--", "true"),
                                env=cli_env(vms, VMFORGE_AGENT_QUEUE_TIMEOUT="1"),
                                capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    err = waiter.stderr.decode()
    assert waiter.returncode != 0
    assert "agent busy" in err and f"pid {holder.pid}" in err, err
    assert "VMFORGE_AGENT_QUEUE_TIMEOUT" in err  # the hint says how to wait longer
    assert "Traceback" not in err
    assert waited < 30
    # The holder was killed: the kernel released its lock, and the channel works again.
    ok = subprocess.run(vmforge("exec", "held", "--", "echo", "free"), env=cli_env(vms),
                        capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, b"free\n"), ok.stderr.decode()
