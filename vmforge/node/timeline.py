"""A VM's boot as a timeline: the phases from the hypervisor's start to readiness.

Pure: the VM record's times and the raw data of the guest agent's ``boot_timing`` call go in
(:func:`build_timeline`), a :class:`Timeline` comes out, shown as rows, JSON, a one-line
summary, or an SVG chart in the manner of ``systemd-analyze plot`` (:func:`render_svg`). No
I/O, so the daemon can serve it as the CLI does.

Clocks. Everything is placed on the host's clock, in seconds since the hypervisor was started
(the record's ``started_at``):

* The guest's monotonic clocks (``/proc/uptime``, the kernel log's timestamps, systemd's
  ``*TimestampMonotonic``) count from the kernel's start. The client pairs a guest uptime with
  the host's time (the ``anchor``: the midpoint of a ping's round trip), which puts the
  kernel's start on the host's clock; everything before it is hypervisor start-up, firmware and
  loading the kernel.
* cloud-init writes wall-clock times: its log in UTC (what ``cloud-init analyze`` parses), and
  ``status.json`` in seconds since the epoch before 24.x (uptime since). Each stage's banner
  ("Cloud-init v. 22.4.2 running 'init' at Thu, 02 May 2024 10:00:03 +0000. Up 5.21 seconds.")
  pairs a wall-clock time with an uptime, which maps the guest's wall clock to its uptime even
  when NTP stepped the clock later.

The top-level phases are consecutive (they add up to the time to ready); the detail rows (each
cloud-init stage and module, the agent's process) sit under them and may overlap.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["Phase", "Mark", "Timeline", "CloudInitEvent", "build_timeline",
           "parse_cloud_init_log", "render_svg", "STAGES"]

# cloud-init's boot stages in the order they run, named as `cloud-init analyze` names them.
STAGES = ("init-local", "init-network", "modules-config", "modules-final")
_STATUS_KEYS = {"init-local": "init-local", "init": "init-network",
                "modules-config": "modules-config", "modules-final": "modules-final"}
_EPOCH_MIN = 1e8  # a status.json time above this is since the epoch, below it an uptime

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - [^\[\]]*\[\w+\]: (.*)$")
_BANNER = re.compile(r"^Cloud-init v\. \S+ running '([^']+)' at .*?\bUp ([\d.]+) seconds")
_EVENT = re.compile(r"^(start|finish): (\S+?):? (.*)$")
_RUN_INIT = re.compile(r"^Run (\S+) as init process")

SHORT = {"firmware": "firmware", "kernel": "kernel", "initrd": "initrd", "init": "init",
         "cloud-init": "cloud-init", "agent": "agent", "provision": "provision"}


@dataclass(frozen=True)
class Phase:
    """One bar: ``start`` and ``end`` in seconds since the hypervisor started."""
    key: str       # machine-readable: firmware, kernel, initrd, init, cloud-init, agent, ...
    name: str      # for people
    start: float
    end: float
    depth: int = 0  # 0: a consecutive top-level phase; 1, 2: parts of the one above
    detail: str = ""

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "start": round(self.start, 4),
                "end": round(self.end, 4), "seconds": round(self.seconds, 4),
                "depth": self.depth, "detail": self.detail}


@dataclass(frozen=True)
class Mark:
    """An instant: the kernel's start, the agent's start, readiness."""
    name: str
    t: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "t": round(self.t, 4)}


@dataclass(frozen=True)
class Timeline:
    vm: str
    started_at: float | None  # the host's epoch time of the hypervisor's start
    ready: float | None       # seconds from the start to readiness
    phases: tuple[Phase, ...]
    marks: tuple[Mark, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def top(self) -> tuple[Phase, ...]:
        return tuple(p for p in self.phases if p.depth == 0)

    @property
    def end(self) -> float:
        ends = [p.end for p in self.phases] + [m.t for m in self.marks]
        if self.ready is not None:
            ends.append(self.ready)
        return max(ends, default=0.0)

    def phase(self, key: str) -> Phase | None:
        return next((p for p in self.phases if p.key == key), None)

    def summary(self) -> str:
        """``ready in 24.1s: firmware 0.3s · kernel 6.0s · init 11.2s · cloud-init 5.1s ·
        agent 1.8s``: the consecutive phases."""
        if not self.phases:
            return "no boot recorded"
        parts = [f"{SHORT.get(p.key, p.key)} {p.seconds:.1f}s" for p in self.top
                 if p.seconds >= 0.05 or p.key != "firmware"]
        head = f"ready in {self.ready:.1f}s" if self.ready is not None \
            else f"booted in {self.end:.1f}s"
        return head + (": " + " · ".join(parts) if parts else "")

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "started_at": self.started_at,
                "ready_seconds": None if self.ready is None else round(self.ready, 4),
                "summary": self.summary(), "phases": [p.to_json() for p in self.phases],
                "marks": [m.to_json() for m in self.marks], "notes": list(self.notes)}


# ---------------------------------------------------------------------------- cloud-init log

@dataclass(frozen=True)
class CloudInitEvent:
    """One event of cloud-init's log, as ``cloud-init analyze dump`` reads them."""
    name: str            # "init-local", "modules-config/config-ssh", ...
    event_type: str      # "start" or "finish"
    timestamp: float     # seconds since the epoch (the log is in UTC)
    description: str = ""
    result: str | None = None  # of a finish: SUCCESS, FAIL, WARN
    up: float | None = None    # a stage banner's uptime ("Up 5.21 seconds")


def _stage_name(raw: str) -> str:
    name = raw.replace(":", "-")  # older versions: 'modules:config'
    return "init-network" if name == "init" else name


def parse_cloud_init_log(lines: Iterable[str]) -> list[CloudInitEvent]:
    """The events of cloud-init's log (its default file format: ``2024-05-02 10:00:03,123 -
    handlers.py[DEBUG]: start: init-local/check-cache: ...``); other lines are skipped."""
    events = []
    for line in lines:
        m = _LOG_LINE.match(line.strip())
        if not m:
            continue
        try:
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(
                tzinfo=UTC).timestamp()
        except ValueError:
            continue
        message = m.group(2)
        banner = _BANNER.match(message)
        if banner:
            events.append(CloudInitEvent(_stage_name(banner.group(1)), "start", ts,
                                         "banner", up=float(banner.group(2))))
            continue
        ev = _EVENT.match(message)
        if not ev:
            continue
        kind, name, rest = ev.groups()
        result = None
        if kind == "finish":
            result, _, rest = rest.partition(": ")
        events.append(CloudInitEvent(name.rstrip(":"), kind, ts, rest.strip(), result))
    return events


def _this_boot(events: list[CloudInitEvent], boot_epoch: float | None) -> tuple[
        list[CloudInitEvent], float | None]:
    """The events of the current boot (the log keeps every boot's) and the guest's
    wall-clock time at uptime 0 as the stage banners tell it (None without banners)."""
    starts = [i for i, e in enumerate(events) if e.name == "init-local" and e.event_type ==
              "start" and e.up is not None]
    if not starts:
        starts = [i for i, e in enumerate(events) if e.name == "init-local"
                  and e.event_type == "start"]
    if starts:
        current = events[starts[-1]:]
    elif boot_epoch is not None:  # no init-local stage: this boot's by the clock
        current = [e for e in events if e.timestamp >= boot_epoch - 60]
    else:
        current = events
    offsets = [e.timestamp - e.up for e in current if e.up is not None]
    offset = statistics.median(offsets) if offsets else None
    # A log whose last boot is not this one (cloud-init did not run this time) says nothing
    # about this boot. The wall clock may have been stepped since: a minute's slack.
    if boot_epoch is not None and (
            (offset is not None and abs(offset - boot_epoch) > 60)
            or (offset is None and current and current[-1].timestamp < boot_epoch - 60)):
        return [], None
    return current, offset


# ---------------------------------------------------------------------------- the model

def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _kmsg_init(kmsg: Sequence[Sequence[Any]] | None) -> tuple[float | None, str | None]:
    """When (seconds of uptime) the kernel started the first userspace program, and which."""
    for rec in kmsg or ():
        if len(rec) >= 2:
            m = _RUN_INIT.match(str(rec[1]))
            if m:
                return int(rec[0]) / 1e6, m.group(1)
    return None, None


def _cloud_init_rows(ci: dict[str, Any], boot_epoch: float | None,
                     to_t: Callable[[float], float],
                     now_uptime: float | None) -> tuple[list[Phase], list[str]]:
    """Stage and module rows (depth 1 and 2), in uptime seconds mapped by ``to_t``."""
    notes: list[str] = []
    events, offset = _this_boot(parse_cloud_init_log(ci.get("log") or []), boot_epoch)
    if offset is None:
        offset = boot_epoch

    def uptime_of(value: float | None) -> float | None:
        if value is None:
            return None
        if value < _EPOCH_MIN:
            return value  # cloud-init 24.x writes uptimes
        return None if offset is None else value - offset

    stages: dict[str, list[float | None]] = {}
    status = (ci.get("status") or {}).get("v1") if isinstance(ci.get("status"), dict) else None
    errors: dict[str, int] = {}
    if isinstance(status, dict):
        for key, stage in _STATUS_KEYS.items():
            info = status.get(key)
            if isinstance(info, dict) and info.get("start") is not None:
                stages[stage] = [uptime_of(_float(info.get("start"))),
                                 uptime_of(_float(info.get("finished")))]
                errors[stage] = len(info.get("errors") or [])
    opened: dict[str, list[CloudInitEvent]] = {}
    pairs: list[tuple[CloudInitEvent, CloudInitEvent | None]] = []
    for e in events:
        if e.up is not None:
            continue  # a banner: the reporting event of the same stage follows
        if e.event_type == "start":
            opened.setdefault(e.name, []).append(e)
        elif e.event_type == "finish" and opened.get(e.name):
            pairs.append((opened[e.name].pop(), e))
    pairs.extend((s, None) for starts in opened.values() for s in starts)
    for start, finish in pairs:
        if start.name in STAGES and start.name not in stages:
            stages[start.name] = [uptime_of(start.timestamp),
                                  uptime_of(finish.timestamp) if finish else None]
    rows: list[Phase] = []
    for stage in STAGES:
        if stage not in stages:
            continue
        begin, finish_up = stages[stage]
        if begin is None:
            continue
        detail = f"{errors[stage]} error(s)" if errors.get(stage) else ""
        if finish_up is None:
            finish_up = now_uptime if now_uptime is not None else begin
            detail = "still running"
        rows.append(Phase(f"cloud-init:{stage}", stage, to_t(begin), to_t(finish_up), 1,
                          detail))
        modules = sorted(((s, f) for s, f in pairs if s.name.startswith(stage + "/")),
                         key=lambda p: p[0].timestamp)
        for s, f in modules:
            b_up = uptime_of(s.timestamp)
            e_up = uptime_of(f.timestamp) if f else None
            if b_up is None:
                continue
            rows.append(Phase(f"cloud-init:{s.name}", s.name, to_t(b_up),
                              to_t(e_up if e_up is not None else b_up), 1 + s.name.count("/"),
                              (f.result or "") if f else "no finish event"))
    if not rows and (ci.get("status") or ci.get("log")):
        notes.append("cloud-init left no timing data of this boot")
    return rows, notes


def build_timeline(vm: str, started_at: float | None, ready_at: float | None,
                   boot: dict[str, Any] | None,
                   provision: Sequence[dict[str, Any]] = ()) -> Timeline:
    """The timeline from the record's times (the host's epoch seconds), the guest's raw
    ``boot_timing`` data with the client's ``anchor`` (None: the guest could not be asked),
    and provisioning steps (``{"step", "start" (epoch), "seconds"}``) if they were recorded."""
    notes: list[str] = []
    marks: list[Mark] = []
    phases: list[Phase] = []
    anchor = (boot or {}).get("anchor") or {}
    host_time, guest_up = _float(anchor.get("host_time")), _float(anchor.get("uptime"))
    kernel0 = host_time - guest_up if host_time is not None and guest_up is not None else None
    if kernel0 is not None and ready_at is not None and kernel0 > ready_at + 1.0:
        notes.append("the guest has rebooted since it was ready: the phases are of the "
                     "current boot, timed from its kernel's start")
        started_at = ready_at = None
    origin = started_at if started_at is not None else kernel0
    ready = ready_at - origin if ready_at is not None and origin is not None else None

    if boot is None or kernel0 is None or origin is None:
        if ready is not None:
            phases.append(Phase("boot", "boot (hypervisor start to ready)", 0.0, ready))
        notes.append("the guest agent was not asked (the VM is not running or has no agent): "
                     "only the total is known")
        return Timeline(vm, started_at, ready, tuple(phases), (), tuple(notes))

    k0 = kernel0 - origin

    def to_t(uptime: float) -> float:
        return k0 + uptime

    guest_time, guest_now = _float(boot.get("time")), _float(boot.get("uptime"))
    boot_epoch = guest_time - guest_now if guest_time is not None and guest_now is not None \
        else None
    now_t = to_t(guest_up) if guest_up is not None else None

    # Boundaries in uptime seconds.
    run_init, init_path = _kmsg_init(boot.get("kmsg"))
    sd = boot.get("systemd") or {}
    sd_initrd = (sd.get("InitRDTimestampMonotonic") or 0) / 1e6 or None
    sd_user = (sd.get("UserspaceTimestampMonotonic") or 0) / 1e6 or None
    kernel_end = sd_initrd or run_init or sd_user
    initrd: tuple[float, float] | None = None
    if sd_initrd and sd_user and sd_user > sd_initrd:
        initrd = (sd_initrd, sd_user)
    elif run_init and sd_user and sd_user > run_init + 0.01:
        initrd = (run_init, sd_user)  # an initramfs without systemd (initramfs-tools)
    agent_main = _float(boot.get("agent_started"))
    agent_exec = _float(boot.get("agent_exec"))  # before the interpreter's start-up
    agent_up = agent_exec if agent_exec is not None else agent_main

    ci_rows: list[Phase] = []
    ci = boot.get("cloud_init")
    if isinstance(ci, dict):
        ci_rows, ci_notes = _cloud_init_rows(ci, boot_epoch, to_t, guest_up)
        notes += ci_notes
    stage_rows = [p for p in ci_rows if p.depth == 1]

    # Consecutive top-level phases: (key, name, end in host seconds).
    bounds: list[tuple[str, str, float | None, str]] = []
    if started_at is not None:
        bounds.append(("firmware", "hypervisor + firmware", k0,
                       "hypervisor start-up, firmware, loading the kernel"))
    if kernel_end is not None:
        bounds.append(("kernel", "kernel", to_t(kernel_end), ""))
    if initrd is not None:
        bounds.append(("initrd", "initrd", to_t(initrd[1]),
                       f"{init_path or 'initramfs'} until the real init"))
    init_end = stage_rows[0].start if stage_rows else (
        to_t(agent_up) if agent_up is not None else None)
    if init_end is not None:
        name = "init" if kernel_end is not None else "kernel + init"
        detail = ("systemd" if sd_user else (init_path or "")) + " until " + (
            "cloud-init" if stage_rows else "the agent started")
        bounds.append(("init" if kernel_end is not None else "kernel", name, init_end, detail))
    if stage_rows:
        bounds.append(("cloud-init", "cloud-init", max(p.end for p in stage_rows),
                       f"{len(stage_rows)} stage(s)"))
    end = ready if ready is not None else now_t
    bounds.append(("agent", "agent", end,
                   "until the host saw the agent's hello (and cloud-init done)"))
    t = 0.0
    for key, name, upto, detail in bounds:
        if upto is None:
            continue
        upto = max(t, upto)
        phases.append(Phase(key, name, t, upto, 0, detail))
        if key == "cloud-init":
            phases.extend(ci_rows)
        t = upto
    if agent_up is not None:
        phases.append(Phase("agent:process", "agent process", to_t(agent_up), max(
            to_t(agent_up), end if end is not None else to_t(agent_up)), 1,
            "from its start to readiness" + (
                f" (Python start-up {agent_main - agent_exec:.2f}s)"
                if agent_main is not None and agent_exec is not None else "")))
        marks.append(Mark("agent started", to_t(agent_up)))
    if k0 < -0.5:
        notes.append(f"the guest's clock puts its kernel's start {-k0:.1f}s before the "
                     "hypervisor's: its uptime and the host's clock disagree")
    marks.insert(0, Mark("kernel start", k0))
    if ready is not None:
        marks.append(Mark("ready", ready))
    if sd and not sd_user:
        notes.append("systemd reported no userspace start time")
    if run_init is None and not sd_user:
        notes.append("the kernel log was not readable: kernel and init are one phase")

    if provision and origin is not None:
        steps = []
        for step in provision:
            s = _float(step.get("start"))
            sec = _float(step.get("seconds")) or 0.0
            if s is not None:
                steps.append(Phase("provision:step", str(step.get("step", "step")),
                                   s - origin, s - origin + sec, 1))
        if steps:
            first = min(p.start for p in steps)
            phases.append(Phase("provision", "provision", max(t, first),
                                max(p.end for p in steps), 0, f"{len(steps)} step(s)"))
            phases.extend(steps)
    return Timeline(vm, started_at, ready, tuple(phases), tuple(marks), tuple(notes))


# ---------------------------------------------------------------------------- SVG

_COLOURS = {"firmware": "#9e9e9e", "kernel": "#f4a261", "initrd": "#e9c46a",
            "init": "#2a9d8f", "cloud-init": "#457b9d", "agent": "#8ab17d",
            "provision": "#b5838d", "boot": "#9e9e9e"}
_SVG_NS = "http://www.w3.org/2000/svg"


def _colour(p: Phase) -> str:
    return _COLOURS.get(p.key.split(":", 1)[0], "#607d8b")


def _tick_step(total: float) -> float:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if total / step <= 20:
            return float(step)
    return 1200.0


def render_svg(tl: Timeline, *, width: int = 1000) -> str:
    """The timeline as an SVG document: one bar per phase on a time axis (seconds since the
    hypervisor started), like ``systemd-analyze plot``; hover a bar for its exact times."""
    import xml.etree.ElementTree as ET

    total = max(tl.end, 0.1)
    scale = width / total
    left, top, row_h, label_w = 20, 60, 18, 360
    rows = list(tl.phases)
    height = top + row_h * len(rows) + 40
    svg = ET.Element("svg", {"xmlns": _SVG_NS, "version": "1.1",
                             "width": str(left + width + label_w),
                             "height": str(height), "font-family": "sans-serif",
                             "font-size": "11"})
    ET.SubElement(svg, "title").text = f"vmforge timeline of {tl.vm}"
    ET.SubElement(svg, "rect", {"x": "0", "y": "0", "width": "100%", "height": "100%",
                                "fill": "#ffffff"})
    heading = ET.SubElement(svg, "text", {"x": str(left), "y": "20", "font-size": "15",
                                          "font-weight": "bold"})
    heading.text = f"{tl.vm}: {tl.summary()}"
    if tl.notes:
        ET.SubElement(svg, "text", {"x": str(left), "y": "38", "fill": "#a00"}).text = \
            "; ".join(tl.notes)
    axis = ET.SubElement(svg, "g", {"class": "axis", "stroke": "#dddddd"})
    step = _tick_step(total)
    i = 0
    while i * step <= total + 1e-9:
        x = left + i * step * scale
        ET.SubElement(axis, "line", {"x1": f"{x:.1f}", "y1": str(top - 8), "x2": f"{x:.1f}",
                                     "y2": str(height - 30)})
        label = ET.SubElement(svg, "text", {"x": f"{x:.1f}", "y": str(top - 12),
                                            "text-anchor": "middle", "fill": "#555"})
        label.text = f"{i * step:g}s"
        i += 1
    bars = ET.SubElement(svg, "g", {"class": "phases"})
    for n, p in enumerate(rows):
        y = top + n * row_h
        x = left + max(0.0, p.start) * scale
        w = max(1.0, p.seconds * scale)
        bar = ET.SubElement(bars, "rect", {
            "x": f"{x:.1f}", "y": str(y), "width": f"{w:.1f}", "height": str(row_h - 4),
            "fill": _colour(p), "fill-opacity": f"{1.0 - 0.25 * p.depth:.2f}",
            "class": p.key.split(":", 1)[0]})
        ET.SubElement(bar, "title").text = (
            f"{p.name}: {p.start:.3f}s to {p.end:.3f}s ({p.seconds:.3f}s)"
            + (f" - {p.detail}" if p.detail else ""))
        text = ET.SubElement(bars, "text", {"x": f"{x + w + 4:.1f}", "y": str(y + row_h - 7)})
        text.text = f"{'  ' * p.depth}{p.name} ({p.seconds:.2f}s)"
    height += 14 * max(0, len(tl.marks) - 1)
    svg.set("height", str(height))
    for n, mark in enumerate(tl.marks):
        x = left + max(0.0, mark.t) * scale
        y = top + row_h * len(rows) + 24 + 14 * n
        ET.SubElement(svg, "line", {"x1": f"{x:.1f}", "y1": str(top - 8), "x2": f"{x:.1f}",
                                    "y2": str(y - 10), "stroke": "#c00",
                                    "stroke-dasharray": "3,3"})
        ET.SubElement(svg, "text", {"x": f"{x + 2:.1f}", "y": str(y),
                                    "fill": "#c00"}).text = f"{mark.name} {mark.t:.2f}s"
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(svg, encoding="unicode")
