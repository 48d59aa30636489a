"""The boot timeline's pure part: raw guest data (written by hand in the formats cloud-init
documents and writes) to phases, summary, JSON and SVG."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vmforge.agent import guest
from vmforge.agent.client import AgentClient
from vmforge.node.timeline import (
    STAGES,
    Timeline,
    build_timeline,
    parse_cloud_init_log,
    render_svg,
)

SVG = "{http://www.w3.org/2000/svg}"
W0 = 1714644000.0  # the guest's wall clock at its kernel's start: 2024-05-02 10:00:00 UTC
H0 = 5000.0        # the host's clock when the hypervisor was started
FIRMWARE = 0.4     # the kernel starts 0.4 s later, by the host's clock

# /var/log/cloud-init.log of cloud-init 22.4 (Debian 12), event lines only (as the agent sends
# them), with an earlier boot's lines first: they must not count.
LOG_22 = """\
2024-05-01 09:00:05,000 - util.py[DEBUG]: Cloud-init v. 22.4.2 running 'init-local' at Wed, 01 May 2024 09:00:05 +0000. Up 5.00 seconds.
2024-05-01 09:00:05,100 - handlers.py[DEBUG]: start: init-local/search-NoCloud: searching for local data from DataSourceNoCloud
2024-05-01 09:00:05,900 - handlers.py[DEBUG]: finish: init-local/search-NoCloud: SUCCESS: found local data from DataSourceNoCloud
2024-05-01 09:00:09,000 - util.py[DEBUG]: Cloud-init v. 22.4.2 finished at Wed, 01 May 2024 09:00:09 +0000. Datasource DataSourceNoCloud [seed=/dev/sr0][dsmode=net].  Up 9.00 seconds
2024-05-02 10:00:05,210 - util.py[DEBUG]: Cloud-init v. 22.4.2 running 'init-local' at Thu, 02 May 2024 10:00:05 +0000. Up 5.21 seconds.
2024-05-02 10:00:05,215 - handlers.py[DEBUG]: start: init-local: searching for local datasources
2024-05-02 10:00:05,300 - handlers.py[DEBUG]: start: init-local/check-cache: attempting to read from cache [check]
2024-05-02 10:00:05,310 - handlers.py[DEBUG]: finish: init-local/check-cache: SUCCESS: no cache found
2024-05-02 10:00:05,320 - handlers.py[DEBUG]: start: init-local/search-NoCloud: searching for local data from DataSourceNoCloud
2024-05-02 10:00:05,900 - handlers.py[DEBUG]: finish: init-local/search-NoCloud: SUCCESS: found local data from DataSourceNoCloud
2024-05-02 10:00:06,000 - handlers.py[DEBUG]: finish: init-local: SUCCESS: searching for local datasources
2024-05-02 10:00:07,010 - util.py[DEBUG]: Cloud-init v. 22.4.2 running 'init' at Thu, 02 May 2024 10:00:07 +0000. Up 7.01 seconds.
2024-05-02 10:00:07,020 - handlers.py[DEBUG]: start: init-network: searching for network datasources
2024-05-02 10:00:07,100 - handlers.py[DEBUG]: start: init-network/check-cache: attempting to read from cache [trust]
2024-05-02 10:00:07,110 - handlers.py[DEBUG]: finish: init-network/check-cache: SUCCESS: restored from cache: DataSourceNoCloud
2024-05-02 10:00:07,200 - handlers.py[DEBUG]: start: init-network/consume-user-data: reading and applying user-data
2024-05-02 10:00:07,400 - handlers.py[DEBUG]: finish: init-network/consume-user-data: SUCCESS: reading and applying user-data
2024-05-02 10:00:07,500 - handlers.py[DEBUG]: start: init-network/config-growpart: running config-growpart with frequency always
2024-05-02 10:00:08,100 - handlers.py[DEBUG]: finish: init-network/config-growpart: SUCCESS: config-growpart ran successfully
2024-05-02 10:00:08,200 - handlers.py[DEBUG]: start: init-network/config-ssh: running config-ssh with frequency once-per-instance
2024-05-02 10:00:08,800 - handlers.py[DEBUG]: finish: init-network/config-ssh: SUCCESS: config-ssh ran successfully
2024-05-02 10:00:08,900 - handlers.py[DEBUG]: finish: init-network: SUCCESS: searching for network datasources
2024-05-02 10:00:09,500 - util.py[DEBUG]: Cloud-init v. 22.4.2 running 'modules:config' at Thu, 02 May 2024 10:00:09 +0000. Up 9.50 seconds.
2024-05-02 10:00:09,510 - handlers.py[DEBUG]: start: modules-config: running modules for config
2024-05-02 10:00:09,600 - handlers.py[DEBUG]: start: modules-config/config-locale: running config-locale with frequency once-per-instance
2024-05-02 10:00:09,610 - handlers.py[DEBUG]: finish: modules-config/config-locale: SUCCESS: config-locale ran successfully
2024-05-02 10:00:09,700 - handlers.py[DEBUG]: start: modules-config/config-runcmd: running config-runcmd with frequency once-per-instance
2024-05-02 10:00:09,750 - handlers.py[WARNING]: finish: modules-config/config-runcmd: FAIL: running config-runcmd with frequency once-per-instance
2024-05-02 10:00:10,000 - handlers.py[DEBUG]: finish: modules-config: SUCCESS: running modules for config
2024-05-02 10:00:10,500 - util.py[DEBUG]: Cloud-init v. 22.4.2 running 'modules:final' at Thu, 02 May 2024 10:00:10 +0000. Up 10.50 seconds.
2024-05-02 10:00:10,510 - handlers.py[DEBUG]: start: modules-final: running modules for final
2024-05-02 10:00:10,600 - handlers.py[DEBUG]: start: modules-final/config-scripts-user: running config-scripts-user with frequency once-per-instance
2024-05-02 10:00:12,600 - handlers.py[DEBUG]: finish: modules-final/config-scripts-user: SUCCESS: config-scripts-user ran successfully
2024-05-02 10:00:12,700 - handlers.py[DEBUG]: start: modules-final/config-final-message: running config-final-message with frequency always
2024-05-02 10:00:12,710 - handlers.py[DEBUG]: finish: modules-final/config-final-message: SUCCESS: config-final-message ran successfully
2024-05-02 10:00:13,000 - util.py[DEBUG]: Cloud-init v. 22.4.2 finished at Thu, 02 May 2024 10:00:13 +0000. Datasource DataSourceNoCloud [seed=/dev/sr0][dsmode=net].  Up 13.00 seconds
2024-05-02 10:00:13,010 - handlers.py[DEBUG]: finish: modules-final: SUCCESS: running modules for final
""".splitlines()  # noqa: E501  (the log's lines as written)


def status(epoch: bool) -> dict[str, Any]:
    """/run/cloud-init/status.json: seconds since the epoch before cloud-init 24.x, uptime
    since (``cloudinit/cmd/main.py`` ``status_wrapper``)."""
    base = W0 if epoch else 0.0

    def stage(start: float, finished: float) -> dict[str, Any]:
        return {"errors": [], "recoverable_errors": {}, "start": base + start,
                "finished": base + finished}
    return {"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0][dsmode=net]",
                   "init-local": stage(5.2, 6.0), "init": stage(7.0, 8.9),
                   "modules-config": stage(9.5, 10.0), "modules-final": stage(10.5, 13.01),
                   "stage": None}}


def cloud_boot(*, epoch_status: bool = True, log: list[str] | None = None,
               clock_step: float = 0.0) -> dict[str, Any]:
    """What the agent's boot_timing call returns for a Debian cloud-image boot, plus the
    client's anchor: asked at uptime 20 s."""
    return {
        "boot_id": "b1", "agent_started": 12.0, "uptime": 20.0,
        "time": W0 + 20.0 + clock_step,  # NTP may have stepped the wall clock since boot
        "kmsg": [[0, "Linux version 6.1.0-21-cloud-amd64"],
                 [1_800_000, "Run /init as init process"],
                 [3_300_000, "EXT4-fs (vda1): mounted filesystem with ordered data mode"]],
        "systemd": {"KernelTimestampMonotonic": 0, "InitRDTimestampMonotonic": 0,
                    "UserspaceTimestampMonotonic": 3_400_000,
                    "FinishTimestampMonotonic": 13_100_000},
        "cloud_init": {"status": status(epoch_status),
                       "result": {"v1": {"datasource": "DataSourceNoCloud", "errors": []}},
                       "log": LOG_22 if log is None else log},
        "anchor": {"host_time": H0 + FIRMWARE + 20.0, "uptime": 20.0, "rtt": 0.002},
    }


def top(tl: Timeline) -> dict[str, tuple[float, float]]:
    return {p.key: (round(p.start, 3), round(p.end, 3)) for p in tl.top}


def test_parse_cloud_init_log_events() -> None:
    events = parse_cloud_init_log(LOG_22)
    banners = [e for e in events if e.up is not None]
    assert [b.name for b in banners] == ["init-local", "init-local", "init-network",
                                         "modules-config", "modules-final"]
    assert banners[1].up == 5.21 and banners[1].timestamp == pytest.approx(W0 + 5.21)
    runcmd = [e for e in events if e.name == "modules-config/config-runcmd"]
    assert [(e.event_type, e.result) for e in runcmd] == [("start", None), ("finish", "FAIL")]
    assert all(e.event_type in ("start", "finish") for e in events)
    assert parse_cloud_init_log(["garbage", "", "2024-05-02 10:00:00,000 - x.py[DEBUG]: hi"]) \
        == []


def test_cloud_image_boot_phases_in_order() -> None:
    tl = build_timeline("cloudy", H0, H0 + FIRMWARE + 14.0, cloud_boot())
    assert [p.key for p in tl.top] == ["firmware", "kernel", "initrd", "init", "cloud-init",
                                       "agent"]
    assert top(tl) == {"firmware": (0.0, 0.4), "kernel": (0.4, 2.2), "initrd": (2.2, 3.8),
                       "init": (3.8, 5.6), "cloud-init": (5.6, 13.41),
                       "agent": (13.41, 14.4)}
    assert tl.ready == pytest.approx(14.4)
    assert sum(p.seconds for p in tl.top) == pytest.approx(tl.ready)
    stages = [p for p in tl.phases if p.depth == 1 and p.key.startswith("cloud-init:")]
    assert [p.name for p in stages] == list(STAGES)
    assert all(a.end <= b.start for a, b in zip(stages, stages[1:], strict=False))
    modules = {p.name: p for p in tl.phases if p.depth == 2}
    assert set(modules) == {"init-local/check-cache", "init-local/search-NoCloud",
                            "init-network/check-cache", "init-network/consume-user-data",
                            "init-network/config-growpart", "init-network/config-ssh",
                            "modules-config/config-locale", "modules-config/config-runcmd",
                            "modules-final/config-scripts-user",
                            "modules-final/config-final-message"}
    ssh = modules["init-network/config-ssh"]
    assert (round(ssh.start, 3), round(ssh.seconds, 3)) == (round(0.4 + 8.2, 3), 0.6)
    assert modules["modules-config/config-runcmd"].detail == "FAIL"
    for stage in stages:  # every module inside its stage
        for m in modules.values():
            if m.name.startswith(stage.name + "/"):
                assert stage.start - 1e-6 <= m.start <= m.end <= stage.end + 1e-6
    assert [m.name for m in tl.marks] == ["kernel start", "agent started", "ready"]
    assert tl.summary() == ("ready in 14.4s: firmware 0.4s · kernel 1.8s · initrd 1.6s · "
                            "init 1.8s · cloud-init 7.8s · agent 1.0s")
    assert not tl.notes


def test_uptime_status_json_of_newer_cloud_init_gives_the_same_stages() -> None:
    old = build_timeline("c", H0, H0 + 14.4, cloud_boot(epoch_status=True))
    new = build_timeline("c", H0, H0 + 14.4, cloud_boot(epoch_status=False))
    assert [(p.name, round(p.start, 3), round(p.end, 3)) for p in old.phases] == \
        [(p.name, round(p.start, 3), round(p.end, 3)) for p in new.phases]


def test_wall_clock_stepped_after_boot_is_mapped_by_the_banners() -> None:
    plain = build_timeline("c", H0, H0 + 14.4, cloud_boot())
    stepped = build_timeline("c", H0, H0 + 14.4, cloud_boot(clock_step=30.0))
    assert top(plain) == top(stepped)


def test_stage_bounds_from_the_log_alone() -> None:
    boot = cloud_boot()
    boot["cloud_init"]["status"] = None
    tl = build_timeline("c", H0, H0 + 14.4, boot)
    stages = {p.name: (round(p.start, 3), round(p.end, 3)) for p in tl.phases
              if p.depth == 1 and p.key.startswith("cloud-init:")}
    assert stages["init-local"] == (round(0.4 + 5.215, 3), 6.4)
    assert list(stages) == list(STAGES)


def test_a_log_of_an_earlier_boot_only_is_ignored() -> None:
    boot = cloud_boot(log=LOG_22[:4])
    boot["cloud_init"]["status"] = None
    tl = build_timeline("c", H0, H0 + 14.4, boot)
    assert tl.phase("cloud-init") is None
    assert "cloud-init left no timing data of this boot" in tl.notes


def test_a_boot_without_init_local_is_found_by_the_clock() -> None:
    boot = cloud_boot(log=[line for line in LOG_22 if "init-local" not in line])
    boot["cloud_init"]["status"] = None
    tl = build_timeline("c", H0, H0 + 14.4, boot)
    stages = [p.name for p in tl.phases if p.depth == 1 and p.key.startswith("cloud-init:")]
    assert stages == ["init-network", "modules-config", "modules-final"]
    never = build_timeline("new", None, None, None)
    assert never.phases == () and never.summary() == "no boot recorded"


def test_running_stage_ends_now() -> None:
    boot = cloud_boot(log=[])
    boot["cloud_init"]["status"]["v1"]["modules-final"]["finished"] = None
    tl = build_timeline("c", H0, None, boot)
    final = next(p for p in tl.phases if p.name == "modules-final")
    assert final.detail == "still running" and final.end == pytest.approx(FIRMWARE + 20.0)
    assert tl.ready is None and tl.summary().startswith("booted in ")


def test_minimal_image_without_cloud_init_or_systemd() -> None:
    boot = {"boot_id": "m", "agent_started": 1.3, "agent_exec": 0.9, "uptime": 3.0,
            "time": 100.0,
            "kmsg": [[0, "Linux version 6.1.0"], [650_000, "Run /init as init process"]],
            "systemd": None, "cloud_init": None,
            "anchor": {"host_time": H0 + 0.2 + 3.0, "uptime": 3.0, "rtt": 0.001}}
    tl = build_timeline("mini", H0, H0 + 1.5, boot)
    assert top(tl) == {"firmware": (0.0, 0.2), "kernel": (0.2, 0.85), "init": (0.85, 1.1),
                       "agent": (1.1, 1.5)}
    assert tl.phase("init") is not None and "/init" in tl.phase("init").detail  # type: ignore
    agent = tl.phase("agent:process")
    assert agent is not None and (agent.start, agent.end) == (pytest.approx(1.1), 1.5)
    assert "Python start-up 0.40s" in agent.detail


def test_old_agent_gives_what_it_can() -> None:
    boot = {"agent_started": 1.0, "boot_id": "x",
            "anchor": {"host_time": H0 + 0.3 + 2.0, "uptime": 2.0, "rtt": 0.001}}
    tl = build_timeline("old", H0, H0 + 1.8, boot)
    assert [(p.key, p.name) for p in tl.top] == [("firmware", "hypervisor + firmware"),
                                                  ("kernel", "kernel + init"),
                                                  ("agent", "agent")]
    assert any("kernel log was not readable" in n for n in tl.notes)


def test_no_guest_data_gives_the_total_only() -> None:
    tl = build_timeline("off", H0, H0 + 9.0, None)
    assert [(p.key, p.end) for p in tl.phases] == [("boot", 9.0)]
    assert tl.notes and "not asked" in tl.notes[0]
    assert tl.summary() == "ready in 9.0s: boot 9.0s"


def test_rebooted_guest_is_timed_from_its_kernel() -> None:
    boot = cloud_boot()
    boot["anchor"]["host_time"] = H0 + 500.0
    tl = build_timeline("c", H0, H0 + 14.4, boot)
    assert tl.ready is None and tl.started_at is None
    assert tl.top[0].key == "kernel" and tl.top[0].start == 0.0
    assert any("rebooted" in n for n in tl.notes)


def test_provision_steps_follow_readiness() -> None:
    steps = [{"step": "copy ./app", "start": H0 + 14.5, "seconds": 1.0},
             {"step": "run systemctl restart app", "start": H0 + 15.5, "seconds": 2.0}]
    tl = build_timeline("c", H0, H0 + 14.4, cloud_boot(), provision=steps)
    prov = tl.phase("provision")
    assert prov is not None and (prov.start, prov.end) == (pytest.approx(14.5), 17.5)
    assert [p.name for p in tl.phases if p.key == "provision:step"] == \
        ["copy ./app", "run systemctl restart app"]


def test_json_is_serialisable_and_complete() -> None:
    tl = build_timeline("cloudy", H0, H0 + 14.4, cloud_boot())
    data = json.loads(json.dumps(tl.to_json()))
    assert data["vm"] == "cloudy" and data["ready_seconds"] == 14.4
    assert data["summary"] == tl.summary()
    assert len(data["phases"]) == len(tl.phases)
    assert {"key", "name", "start", "end", "seconds", "depth", "detail"} <= \
        set(data["phases"][0])


def test_svg_is_well_formed_with_one_bar_per_phase() -> None:
    tl = build_timeline("cloudy", H0, H0 + 14.4, cloud_boot())
    text = render_svg(tl)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(text)
    assert root.tag == SVG + "svg"
    assert root.findtext(SVG + "title") == "vmforge timeline of cloudy"
    group = root.find(f"{SVG}g[@class='phases']")
    assert group is not None
    bars = group.findall(SVG + "rect")
    assert len(bars) == len(tl.phases)
    tips = [b.findtext(SVG + "title") or "" for b in bars]
    assert tips[0].startswith("hypervisor + firmware: 0.000s to 0.400s")
    assert any(t.startswith("init-network/config-ssh:") for t in tips)
    xs = [float(b.get("x", "-1")) for b in bars]
    assert all(x >= 0 for x in xs) and all(float(b.get("width", "0")) >= 1 for b in bars)
    top_bars = [b for b, p in zip(bars, tl.phases, strict=True) if p.depth == 0]
    assert [float(b.get("x", 0)) for b in top_bars] == sorted(float(b.get("x", 0))
                                                              for b in top_bars)
    labels = [t.text or "" for t in root.iter(SVG + "text")]
    assert any("ready 14.40s" in t for t in labels) and any(t == "0s" for t in labels)
    assert int(root.get("height", "0")) > 20 * len(tl.phases)


def test_svg_escapes_names() -> None:
    boot = cloud_boot()
    boot["cloud_init"]["log"] = [line.replace("config-ssh", "config-<ssh>&")
                                 for line in LOG_22]
    root = ET.fromstring(render_svg(build_timeline("a<b>", H0, H0 + 14.4, boot)))
    assert root.findtext(SVG + "title") == "vmforge timeline of a<b>"


# ---------------------------------------------------------------------------- the agent call

def test_boot_timing_call_of_the_real_agent_feeds_the_model(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    threading.Thread(target=guest.serve_listener, args=(srv, 0.5), daemon=True).start()

    async def go() -> dict[str, Any]:
        async with AgentClient(path) as c:
            return await c.boot_timing()
    try:
        raw = asyncio.run(go())
    finally:
        srv.close()
    assert {"uptime", "time", "boot_id", "agent_started", "kmsg", "systemd", "cloud_init",
            "anchor"} <= set(raw)
    assert raw["agent_started"] == 0.5 and raw["anchor"]["rtt"] < 5
    kernel0 = raw["anchor"]["host_time"] - raw["anchor"]["uptime"]
    tl = build_timeline("host", kernel0 - 0.1, None, raw)
    assert tl.top[0].key == "firmware" and tl.top[0].seconds == pytest.approx(0.1, abs=0.05)
    ET.fromstring(render_svg(tl))
