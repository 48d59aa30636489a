"""`vmforge timeline VM`: the boot from the hypervisor's start to ready, phase by phase, as a
table, JSON or an SVG chart; and the one-line summary `vmforge run` prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import err, errors_reported, manager, out, print_json
from .complete import VmName

if TYPE_CHECKING:
    from ..node.manager import VmManager, VmRecord
    from ..node.timeline import Timeline

__all__ = ["register_timeline", "collect", "summary_line"]


def register_timeline(app: typer.Typer) -> None:
    app.command("timeline")(timeline_cmd)


def collect(m: VmManager, rec: VmRecord) -> Timeline:
    """The record's times plus, from a running VM's agent, the guest's own timing data."""
    import asyncio

    from ..node.states import VmState
    from ..node.timeline import build_timeline

    boot = None
    if rec.state is VmState.RUNNING and rec.req.spec.agent.enabled:
        async def fetch() -> dict[str, object]:
            async with m.agent(rec.name) as c:
                return await c.boot_timing()
        boot = asyncio.run(fetch())
    return build_timeline(rec.name, rec.started_at, rec.ready_at, boot)


def summary_line(m: VmManager, rec: VmRecord) -> str | None:
    """``ready in 24.1s: kernel 6.0s · init 11.2s · cloud-init 5.1s · agent 1.8s``, or None
    when the guest cannot tell (a summary never fails the command that prints it)."""
    from ..errors import VmforgeError
    try:
        tl = collect(m, rec)
    except (VmforgeError, OSError):
        return None
    return tl.summary() if len(tl.top) > 1 else None


def timeline_cmd(
    name: VmName,
    svg: Annotated[Path | None, typer.Option(
        "--svg", help="Also write the chart to this SVG file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    show_all: Annotated[bool, typer.Option(
        "--all", help="Every cloud-init event, also those under 50 ms.")] = False,
) -> None:
    """The boot from launch to ready: hypervisor and firmware, kernel, init, each cloud-init
    stage and module (cloud-init's own timing data, read through the agent), the agent."""
    with errors_reported():
        m = manager()
        tl = collect(m, m.get(name))
        if svg is not None:
            from ..node.timeline import render_svg
            try:
                svg.write_text(render_svg(tl))
            except OSError as exc:
                from ..errors import SpecError
                raise SpecError(f"cannot write {svg}: {exc.strerror}", field="--svg") from None
            err.print(f"wrote {svg}", highlight=False)
        if json_out:
            print_json(tl.to_json())
            return
        from rich.markup import escape
        from rich.table import Table
        t = Table(box=None, header_style="bold")
        t.add_column("START", justify="right")
        t.add_column("TIME", justify="right")
        t.add_column("PHASE")
        t.add_column("DETAIL", style="dim")
        for p in tl.phases:
            if p.depth > 1 and p.seconds < 0.05 and not show_all:
                continue
            label = "  " * p.depth + escape(p.name)
            t.add_row(f"{p.start:.2f}s", f"{p.seconds:.2f}s",
                      f"[bold]{label}[/]" if p.depth == 0 else label, escape(p.detail))
        for mark in tl.marks:
            t.add_row(f"{mark.t:.2f}s", "", f"[dim]◆ {mark.name}[/]", "")
        out.print(t)
        out.print(f"[bold]{tl.summary()}[/]", highlight=False)
        for note in tl.notes:
            err.print(f"[yellow]note:[/] {note}", highlight=False)
