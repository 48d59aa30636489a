"""`vmforge timeline` and `run`'s summary on real boots: the minimal image (no cloud-init, no
systemd) and a Debian cloud image (cloud-init's stages and modules, in order)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vmforge.agent.client import AgentClient
from vmforge.node.timeline import STAGES, build_timeline

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

SVG = "{http://www.w3.org/2000/svg}"
MAC = "52:54:00:12:34:57"


def vmforge(vms: VmHelper, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMFORGE_HOME=str(vms.manager.data.root), NO_COLOR="1",
               COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def check_consecutive(data: dict[str, Any]) -> list[dict[str, Any]]:
    top = [p for p in data["phases"] if p["depth"] == 0]
    for a, b in zip(top, top[1:], strict=False):
        assert a["end"] == pytest.approx(b["start"], abs=1e-3), (a, b)
    assert top[0]["start"] == 0
    assert sum(p["seconds"] for p in top) == pytest.approx(data["ready_seconds"], abs=0.01)
    return top


def check_svg(path: Path, phases: int) -> None:
    root = ET.parse(path).getroot()  # well-formed, or this raises
    assert root.tag == SVG + "svg"
    group = root.find(f"{SVG}g[@class='phases']")
    assert group is not None and len(group.findall(SVG + "rect")) == phases


def test_minimal_image_run_summary_and_timeline(vms: VmHelper, tmp_path: Path) -> None:
    spec = tmp_path / "vm.yaml"
    spec.write_text("name: timed\nspec:\n  memory_mib: 256\n  kernel: {image: minimal}\n")
    vms.names.append("timed")  # removed at teardown, however the run ends
    res = vmforge(vms, "run", "-f", str(spec))
    assert res.returncode == 0, res.stderr
    summary = re.search(r"ready in ([\d.]+)s: (.*)", res.stdout)
    assert summary, res.stdout
    assert re.fullmatch(r"(firmware [\d.]+s · )?kernel [\d.]+s · init [\d.]+s · "
                        r"agent [\d.]+s", summary.group(2).strip()), summary.group(2)

    svg = tmp_path / "boot.svg"
    res = vmforge(vms, "timeline", "timed", "--json", "--svg", str(svg))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rec = vms.manager.get("timed")
    assert data["ready_seconds"] == pytest.approx(rec.boot_seconds, abs=0.01)
    top = check_consecutive(data)
    assert [p["key"] for p in top] == ["firmware", "kernel", "init", "agent"]
    kernel = top[1]
    assert 0 < kernel["seconds"] < data["ready_seconds"]
    assert "/init" in top[2]["detail"]  # the kernel log named the init it started
    assert not data["notes"], data["notes"]
    assert [m["name"] for m in data["marks"]] == ["kernel start", "agent started", "ready"]
    check_svg(svg, len(data["phases"]))

    table = vmforge(vms, "timeline", "timed")
    assert table.returncode == 0, table.stderr
    assert "hypervisor + firmware" in table.stdout and "kernel" in table.stdout
    assert data["summary"] in table.stdout


def test_cloud_image_timeline_has_cloud_init_stages_in_order(
        vms: VmHelper, debian_image: str, tmp_path: Path) -> None:
    user_data = "\n".join([
        "#cloud-config",
        "users:",
        "  - name: alice",
        "    shell: /bin/bash",
        "runcmd:",
        "  - [sh, -c, 'sleep 1; echo ran > /var/tmp/runcmd-marker']",
        ""])
    network = "\n".join(["version: 2", "ethernets:", "  eth0:",
                         f"    match: {{macaddress: '{MAC}'}}", "    set-name: eth0",
                         "    dhcp4: true", ""])
    rec = vms.run("timely", kernel=None, memory_mib=1024, cpu_cores=2,
                  disks=[{"id": "root", "size_gib": 4, "bootable": True,
                          "image": debian_image}],
                  nics=[{"id": "net0", "mac": MAC}],
                  cloud_init={"user_data": user_data, "network_config": network})
    assert rec.state == "running"

    raw = vms.call("timely", lambda c: c.boot_timing())
    assert raw["cloud_init"]["status"]["v1"]["modules-final"]["finished"]
    assert raw["systemd"]["UserspaceTimestampMonotonic"] > 0
    tl = build_timeline("timely", rec.started_at, rec.ready_at, raw)
    assert tl.ready == pytest.approx(rec.boot_seconds)
    keys = [p.key for p in tl.top]
    assert keys[:2] == ["firmware", "kernel"] and keys[-2:] == ["cloud-init", "agent"]
    assert "init" in keys
    stages = [p for p in tl.phases if p.depth == 1 and p.key.startswith("cloud-init:")]
    assert [p.name for p in stages] == list(STAGES), tl.phases
    for a, b in zip(stages, stages[1:], strict=False):
        assert a.start <= a.end <= b.start + 0.05, (a, b)
    kernel = tl.phase("kernel")
    assert kernel is not None and kernel.end <= stages[0].start
    modules = {p.name: p for p in tl.phases if p.depth == 2}
    assert "modules-final/config-scripts-user" in modules, list(modules)
    assert modules["modules-final/config-scripts-user"].seconds >= 0.9  # the runcmd's sleep
    for stage in stages:
        for m in modules.values():
            if m.name.startswith(stage.name + "/"):
                assert stage.start - 0.05 <= m.start <= m.end <= stage.end + 0.05, (stage, m)
    assert not tl.notes, tl.notes

    svg = tmp_path / "cloud.svg"
    res = vmforge(vms, "timeline", "timely", "--json", "--svg", str(svg))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    check_consecutive(data)
    assert [p["name"] for p in data["phases"] if p["key"].startswith("cloud-init:")
            and p["depth"] == 1] == list(STAGES)
    check_svg(svg, len(data["phases"]))

    # The same boot: a login shell is the user's shell from passwd.
    async def login(c: AgentClient, user: str | None) -> tuple[int | None, bytes]:
        seen: list[bytes] = []
        s = await c.start_exec(login=True, tty=True, user=user,
                               on_output=lambda _s, d: seen.append(d))
        await s.write(b"echo shell=$0 home=$HOME me=$(id -un); exit 4\n")
        res = await asyncio.wait_for(s.wait(), 120)
        return res.exit_code, b"".join(seen)
    code, screen = vms.call("timely", lambda c: login(c, None))
    assert code == 4 and b"shell=/bin/bash home=/root me=root" in screen, screen
    code, screen = vms.call("timely", lambda c: login(c, "alice"))
    assert code == 4 and b"shell=/bin/bash home=/home/alice me=alice" in screen, screen
