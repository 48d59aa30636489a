"""`vmforge`: VMs (create, run, plan, start, stop, kill, rm, ls, inspect, console), the guest
agent (wait, exec, cp, health), seeds, images and host diagnostics.

The only layer that runs an event loop (``asyncio.run``) around the library's coroutines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from ..spec import VmRequest

from .common import (
    err,
    errors_reported,
    fail,
    human_size,
    manager,
    out,
    print_json,
    progress,
    set_options,
)
from .complete import VmName, VmNames

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  help="Build VM images and run VMs from them (QEMU, with a guest agent).")
seed_app = typer.Typer(no_args_is_help=True, help="cloud-init NoCloud seeds.")
app.add_typer(seed_app, name="seed")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NoSchemaOpt = Annotated[bool, typer.Option(
    "--no-schema-check", help="Do not check cloud-init data against cloud-init's schemas "
    "(YAML syntax and sizes are still checked).")]


@app.callback()
def _root(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", envvar="VMFORGE_HOME", help="State directory "
        "(default $XDG_DATA_HOME/vmforge).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    host: Annotated[str | None, typer.Option(
        "--host", "-H", envvar="VMFORGE_HOST", help="Talk to a vmforge daemon instead: "
        "unix:///path/vmforge.sock or https://node:PORT (token: $VMFORGE_TOKEN or "
        "--token-file).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", envvar="VMFORGE_TOKEN_FILE", help="File holding the daemon's token "
        "(with --host over TCP).")] = None,
) -> None:
    set_options(data_dir, verbose, host=host, token_file=token_file)
    if verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


def _load(spec: Path, name: str | None) -> VmRequest:
    from ..spec import load_request
    return load_request(spec, name)


def _requests(spec: Path, names: list[str] | None) -> list[VmRequest]:
    return [_load(spec, n) for n in names] if names else [_load(spec, None)]


def _arun(coro: Any) -> Any:
    import asyncio
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- lifecycle

@app.command()
def create(
    spec: Annotated[Path, typer.Option("-f", "--file", help="VM spec (YAML or JSON).")],
    name: Annotated[list[str] | None, typer.Option("--name", "-n",
                    help="VM name (repeat to create many from one spec).")] = None,
    no_schema_check: NoSchemaOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Create VM(s) from a spec without starting them."""
    with errors_reported():
        reqs = _requests(spec, name)
        m = manager()
        recs = []
        for req in reqs:
            with progress(f"creating {req.name}") as p:
                m.ensure_images(req, p)
                recs.append(m.create(req, p, schema_check=not no_schema_check))
        if json_out:
            print_json([r.as_dict() for r in recs])
        else:
            for r in recs:
                out.print(f"created [bold]{r.name}[/]")


@app.command("run")
def run_cmd(
    spec: Annotated[Path | None, typer.Option("-f", "--file", help="VM spec (YAML or JSON).")]
    = None,
    name: Annotated[list[str] | None, typer.Option("--name", "-n",
                    help="VM name (repeat to run many from one spec).")] = None,
    from_snapshot: Annotated[str | None, typer.Option(
        "--from-snapshot", help="Restore this snapshot (memory and disks) as each --name "
        "instead of booting a spec.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for ready.")] = 300,
    keep: Annotated[bool, typer.Option("--keep-on-failure",
                    help="Leave a VM that failed to boot or provision, for debugging.")]
    = False,
    no_schema_check: NoSchemaOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Create, start, wait until ready (agent hello) and provision; print the time to ready."""
    with errors_reported():
        if from_snapshot is not None or spec is None:  # vmforge.cli.snapshots
            from .snapshots import from_snapshot_run
            from_snapshot_run(spec, from_snapshot, name, timeout, json_out)
            return
        reqs = _requests(spec, name)
        m = manager()
        recs = []
        for req in reqs:
            with progress(f"{req.name}") as p:
                m.ensure_images(req, p)
                recs.append(_arun(m.run(req, timeout=timeout, progress=p,
                                        base_dir=spec.resolve().parent, keep_on_failure=keep,
                                        schema_check=not no_schema_check)))
        if json_out:
            print_json([r.as_dict() for r in recs])
            return
        for r in recs:
            extra = ""
            if r.req.spec.agent.enabled:
                extra = " (agent ready)"
            pid = f" · pid {r.pid}" if r.pid else ""
            out.print(f"[bold green]{r.name}[/] is ready in [bold]{r.boot_seconds or 0:.2f}s[/]"
                      f"{extra} · {r.backend.value} · accel {r.accel}{pid}", highlight=False)
            from .timeline import summary_line
            if r.req.spec.agent.enabled and (line := summary_line(m, r)):
                out.print(f"[dim]{line}[/]", highlight=False)


@app.command()
def plan(
    spec: Annotated[Path, typer.Option("-f", "--file", help="VM spec (YAML or JSON).")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="VM name.")] = None,
    hypervisor: Annotated[str | None, typer.Option(
        "--hypervisor", help="Plan for this backend instead of the spec's.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what `run` would do, without doing it: resolved images, seed files and the
    backend's part (QEMU argv, libvirt domain XML, or API requests)."""
    with errors_reported():
        req = _load(spec, name)
        if hypervisor:
            from ..spec import parse_request
            # Only what the spec says (exclude_unset): a default (the user-mode NIC) stays a
            # default that the backend may leave out, not a NIC the spec asks for.
            data = req.model_dump(mode="json", by_alias=True, exclude_unset=True)
            data.setdefault("spec", {})["hypervisor"] = hypervisor
            req = parse_request(data, "--hypervisor")
        p = manager().plan(req)
        if json_out:
            print_json(p)
            return
        out.print(f"[bold]{p['name']}[/] on [bold]{p['backend']}[/] · accel {p['accel']} "
                  f"({p['accel_reason']})", highlight=False)
        out.print(f"directory: {p['dir']}", highlight=False)
        for role, ref in p["images"].items():
            out.print(f"image {role}: {ref}", highlight=False)
        for fname, text in p["seed"].items():
            out.print(f"[bold]seed {fname}[/] ({len(text)} bytes)", highlight=False)
        if "argv" in p:
            import shlex
            out.print(" \\\n  ".join(shlex.quote(a) for a in p["argv"]), highlight=False,
                      markup=False)
        elif "domain_xml" in p:
            out.print(p["domain_xml"], highlight=False, markup=False)
        else:
            import json
            for i, r in enumerate(p["requests"], 1):  # the body only where there is one
                out.print(f"{i:2}. {r['method']} {r['path']}", highlight=False, markup=False)
                if r["body"] is not None:
                    body = json.dumps(r["body"], indent=2, sort_keys=False)
                    out.print("\n".join("      " + line for line in body.splitlines()),
                              highlight=False, markup=False, soft_wrap=True)


@app.command()
def start(
    names: VmNames,
    wait: Annotated[bool, typer.Option(help="Wait until ready.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for ready.")] = 300,
) -> None:
    """Start stopped VM(s)."""
    with errors_reported():
        m = manager()
        for n in names:
            with progress(f"starting {n}") as p:
                rec = m.start(n, p)
                if wait:
                    p("waiting until ready")
                    rec = _arun(m.wait_ready(n, timeout, p))
            msg = f" ready in {rec.boot_seconds:.2f}s" if rec.boot_seconds else " started"
            out.print(f"[bold]{n}[/]{msg}", highlight=False)


@app.command()
def stop(
    names: VmNames,
    timeout: Annotated[float, typer.Option(help="Seconds before forcing.")] = 30,
) -> None:
    """Stop VM(s): agent shutdown or ACPI power button, then quit, then kill."""
    with errors_reported():
        m = manager()
        for n in names:
            with progress(f"stopping {n}"):
                how = _arun(m.stop(n, timeout))
            out.print(f"stopped [bold]{n}[/] ({how.value})")


@app.command()
def kill(names: VmNames) -> None:
    """Kill VM(s) at once (SIGKILL to QEMU, destroy under libvirt)."""
    with errors_reported():
        m = manager()
        for n in names:
            m.kill(n)
            out.print(f"killed [bold]{n}[/]")


@app.command("rm")
def rm_cmd(
    names: VmNames,
    force: Annotated[bool, typer.Option("-f", "--force",
                     help="Stop running VMs first (gracefully, then by force).")] = False,
) -> None:
    """Delete VM(s) and their directories."""
    with errors_reported():
        m = manager()
        for n in names:
            _arun(m.delete(n, force=force))
            out.print(f"removed [bold]{n}[/]")


SecretsOpt = Annotated[bool, typer.Option(
    "--show-secrets", help="Show user-data and vendor-data (redacted by default).")]


@app.command("ls")
def ls_cmd(json_out: JsonOpt = False, show_secrets: SecretsOpt = False) -> None:
    """List VMs."""
    from .fast import ls_command
    with errors_reported():
        raise typer.Exit(ls_command(manager(), json_out=json_out, show_secrets=show_secrets))


@app.command()
def inspect(name: VmName, json_out: JsonOpt = False, show_secrets: SecretsOpt = False) -> None:
    """Show everything about a VM (user-data and vendor-data redacted unless asked)."""
    with errors_reported():
        m = manager()
        rec = m.get(name)
        if rec.host_nics():  # the guest's addresses now, when its agent answers at once
            rec = _arun(m.refresh_guest_net(name, timeout=3.0))
        data = m.describe(rec, show_secrets=show_secrets)
        if json_out:
            print_json(data)
            return
        for key in ("name", "state", "backend", "pid", "accel", "boot_seconds", "dir",
                    "console_log", "agent", "stop_reason", "last_error", "ipv4"):
            out.print(f"[bold]{key:>13}[/]: {data[key]}", highlight=False)
        for nic in data.get("nics", []):
            where = nic["network"] or nic["bridge"] or "user-mode NAT"
            lease = nic["lease"]["ip"] if nic["lease"] else "-"
            out.print(f"[bold]{'nic ' + str(nic['id']):>13}[/]: {where} · {nic['mac'] or '-'} · "
                      f"ipv4 {', '.join(nic['ipv4']) or '-'} · lease {lease}", highlight=False)
        if "spec" in data:
            import json
            out.print("[bold]         spec[/]:")
            out.print_json(json.dumps(data["spec"]))


@app.command()
def console(
    name: VmName,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep printing.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Last N lines (0: all).")] = 0,
) -> None:
    """Print the VM's serial console log."""
    import sys
    with errors_reported():
        rec = manager().get(name)
        path = rec.paths.console
        data = path.read_bytes() if path.exists() else b""
        if lines:
            data = b"\n".join(data.splitlines()[-lines:]) + b"\n"
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if follow:
            with open(path, "rb") as f:
                f.seek(0, 2)
                try:
                    while True:
                        chunk = f.read()
                        if chunk:
                            sys.stdout.buffer.write(chunk)
                            sys.stdout.flush()
                        else:
                            time.sleep(0.2)
                except KeyboardInterrupt:
                    pass


# ---------------------------------------------------------------------------- agent

@app.command()
def wait(name: VmName, timeout: Annotated[float, typer.Option(help="Seconds.")] = 300) -> None:
    """Wait until the VM's agent has announced itself."""
    with errors_reported():
        t0 = time.monotonic()
        _arun(manager().wait_ready(name, timeout))
        out.print(f"[bold]{name}[/] is ready ({time.monotonic() - t0:.2f}s)", highlight=False)


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_cmd(
    name: VmName,
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    interactive: Annotated[bool, typer.Option("-i", "--interactive",
                           help="Stream this command's stdin to the guest command.")] = False,
    tty: Annotated[bool, typer.Option("-t", "--tty", help="Give the command a terminal (top, "
                   "vi): raw mode, window size, Ctrl-C to the guest; stdin is forwarded.")]
    = False,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", "-w", help="Working directory.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Kill after this many seconds.")]
    = None,
    shell: Annotated[bool, typer.Option("--shell", help="Run through /bin/sh -c.")] = False,
) -> None:
    """Run a command in the guest; output streams live; exits with the guest's exit code."""
    from .fast import exec_command
    with errors_reported():
        raise typer.Exit(exec_command(manager(), name, command, interactive=interactive,
                                      tty=tty, env=env or [], cwd=cwd, timeout=timeout,
                                      shell=shell))

@app.command()
def cp(
    src: Annotated[str, typer.Argument(help="Source: a local path or VM:/path")],
    dst: Annotated[str, typer.Argument(help="Destination: a local path or VM:/path")],
) -> None:
    """Copy files or directories (recursively) between the host and a VM."""
    from ..errors import SpecError

    def split(arg: str) -> tuple[str | None, str]:
        head, sep, tail = arg.partition(":")
        if sep and head and "/" not in head:
            return head, tail
        return None, arg

    with errors_reported():
        (svm, spath), (dvm, dpath) = split(src), split(dst)
        if bool(svm) == bool(dvm):
            raise SpecError("exactly one of SRC and DST must be VM:/path", field="cp",
                            hint="e.g. vmforge cp ./file vm1:/tmp/file")
        vm = svm or dvm or ""
        if dvm and not Path(spath).exists():
            raise SpecError(f"no such file or directory: {spath}", field="SRC",
                            hint="give an existing local file or directory")
        if svm:
            parent = Path(dpath).resolve().parent
            if not Path(dpath).is_dir() and not parent.is_dir():
                raise SpecError(f"the destination's directory does not exist: {parent}",
                                field="DST", hint=f"mkdir -p {parent}")
        m = manager()
        t0 = time.monotonic()

        async def go() -> int:
            async with m.agent(vm) as c:
                if dvm:
                    return await c.put_tree(spath, dpath)
                return await c.get_tree(spath, dpath)
        n = _arun(go())
        err.print(f"copied {n} file(s) in {time.monotonic() - t0:.2f}s")


@app.command()
def health(name: VmName, json_out: JsonOpt = False) -> None:
    """The guest's health: agent, load, memory, disk, cloud-init and the spec's checks."""
    with errors_reported():
        m = manager()
        rec = m.get(name)
        checks = [c.model_dump(exclude_none=True) for c in rec.req.spec.health_checks]

        async def go() -> dict[str, Any]:
            async with m.agent(name) as c:
                return await c.health(checks)
        h: dict[str, Any] = _arun(go())
        if json_out:
            print_json(h)
        else:
            from rich.table import Table
            t = Table(box=None, show_header=False)
            mem = h["memory"]
            t.add_row("agent", h["agent"])
            t.add_row("uptime", f"{h['uptime']:.1f}s")
            t.add_row("load", " ".join(f"{x:.2f}" for x in h["load"]))
            t.add_row("memory", f"{human_size(mem.get('MemAvailable'))} available of "
                      f"{human_size(mem.get('MemTotal'))}")
            t.add_row("disk /", f"{human_size(h['disk']['free'])} free of "
                      f"{human_size(h['disk']['total'])}")
            t.add_row("cloud-init", h["cloud_init"]["status"])
            for c in h["checks"]:
                t.add_row(f"check {c['name']}", ("[green]ok[/] " if c["ok"] else "[red]FAIL[/] ")
                          + c["detail"])
            out.print(t)
        if not h["healthy"]:
            raise typer.Exit(1)


# ---------------------------------------------------------------------------- seed, doctor

@seed_app.command("build")
def seed_build(
    output: Annotated[Path, typer.Argument(help="Output file.")],
    user_data: Annotated[Path, typer.Option("--user-data", help="user-data file.")],
    meta_data: Annotated[Path | None, typer.Option("--meta-data")] = None,
    network_config: Annotated[Path | None, typer.Option("--network-config")] = None,
    vendor_data: Annotated[Path | None, typer.Option("--vendor-data")] = None,
    fmt: Annotated[str, typer.Option("--format", help="iso or vfat.")] = "iso",
    hostname: Annotated[str, typer.Option(help="Default instance-id/local-hostname.")]
    = "vmforge",
    no_schema_check: NoSchemaOpt = False,
) -> None:
    """Build a NoCloud seed (like cloud-localds), validated first."""
    from .fast import seed_build_command
    with errors_reported():
        raise typer.Exit(seed_build_command(
            output, user_data, meta_data=meta_data, network_config=network_config,
            vendor_data=vendor_data, fmt=fmt, hostname=hostname, schema=not no_schema_check))


@seed_app.command("validate")
def seed_validate(
    files: Annotated[list[Path], typer.Argument(help="user-data, meta-data, network-config or "
                                                "vendor-data files (kind by name, else content).")],
    no_schema_check: NoSchemaOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Check cloud-init files against cloud-init's own schemas (for CI and editors): every
    problem with its line and column; exit 2 if any."""
    from ..seed.validate import validate_files
    with errors_reported():
        problems = validate_files(files, schema=not no_schema_check)
        if json_out:
            print_json([{"file": e.field, "message": e.message, "hint": e.hint}
                        for e in problems])
        else:
            for e in problems:
                err.print(f"[red]{e.message}[/]", highlight=False, markup=True)
                if e.hint:
                    err.print(f"  [yellow]hint:[/] {e.hint}", highlight=False)
            if not problems:
                out.print(f"ok: {len(files)} file(s)")
        if problems:
            raise typer.Exit(2)


@app.command()
def doctor(json_out: JsonOpt = False) -> None:
    """Check the host: QEMU, KVM (really booting), OVMF, busybox, tools, free disk."""
    from .doctor import run_doctor
    with errors_reported():
        checks = run_doctor(manager())
        if json_out:
            print_json(checks)
        else:
            from rich.table import Table
            t = Table(box=None, header_style="bold")
            for col in ("CHECK", "STATUS", "DETAIL", "FIX"):
                t.add_column(col)
            for c in checks:
                mark = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]"}.get(c["status"],
                                                                           "[red]missing[/]")
                t.add_row(c["name"], mark, c["detail"], c.get("fix") or "")
            out.print(t)
        if any(c["status"] == "missing" and c.get("required") for c in checks):
            raise typer.Exit(3)


def _register_images() -> None:
    from .images import image_app
    app.add_typer(image_app, name="image")
    from .serve import register_serve; register_serve(app)  # noqa: E702, I001
    from .shell import register_shell; register_shell(app)  # noqa: E702, I001
    from .timeline import register_timeline; register_timeline(app)  # noqa: E702, I001
    from .launch import register_launch; register_launch(app)  # noqa: E702, I001
    from .network import network_app; app.add_typer(network_app, name="network")  # noqa: E702, I001
    from .snapshots import register_snapshots; register_snapshots(app)  # noqa: E702, I001


_register_images()


def run_app() -> None:
    """The typer application (vmforge.cli.entry runs the fast commands before it)."""
    try:
        app()
    except Exception as exc:  # noqa: BLE001
        from ..errors import VmforgeError
        if isinstance(exc, VmforgeError):
            fail(exc)
        raise
