"""The commands people type most often: `exec`, `ls`, `seed build`.

These are the only implementations of the three. The typer commands in ``main.py`` (which
also give their ``--help``) call them, and :func:`dispatch` calls them straight from the
entry point, before the CLI framework (typer, click, rich: about 100 ms) is imported, so that
the whole command costs little more than Python's own start. Anything :func:`dispatch` does
not recognise goes to typer, which parses it again and reports usage errors.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

TYPE_CHECKING = False  # not typing's: the fast commands must not import it
if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path
    from typing import Any

    from ..agent.client import AgentClient
    from ..node.manager import VmManager

__all__ = ["dispatch", "exec_command", "ls_command", "seed_build_command", "report"]


class _Fallback(Exception):
    """The arguments are not for the fast path (help, a typo): let typer handle them."""


def report(exc: BaseException) -> int:
    """A vmforge error as `error: ...` / `hint: ...` on stderr; its exit code."""
    from ..errors import VmforgeError
    if not isinstance(exc, VmforgeError):
        raise exc
    red, yellow, off = ("\033[1;31m", "\033[33m", "\033[0m") if _colour(sys.stderr) \
        else ("", "", "")
    sys.stderr.write(f"{red}error:{off} {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"{yellow}hint:{off} {exc.hint}\n")
    return exc.exit_code


def _colour(stream: Any) -> bool:
    return bool(stream.isatty()) and "NO_COLOR" not in os.environ


def _manager(data_dir: Path | None = None, command: str = "") -> VmManager:
    """The local manager, or with ``$VMFORGE_HOST`` the daemon's (vmforge.cli.remote; httpx
    is imported only then). ``--host`` on the command line goes the typer way."""
    host = os.environ.get("VMFORGE_HOST")
    if host:
        from typing import cast

        from .remote import RemoteManager
        return cast("VmManager", RemoteManager(host, command=command))
    from ..node.manager import VmManager
    from ..paths import DataDir
    return VmManager(DataDir(data_dir) if data_dir else None)


# ---------------------------------------------------------------------------- exec

# The state database's schema this reader knows (vmforge.state.SCHEMA_VERSION; a unit test
# keeps them equal). Another version: the manager's way.
_STATE_SCHEMA = 3


def quick_agent_endpoint(name: str) -> str | None:
    """Where a running VM's agent answers, read straight from the state database (read-only).

    `vmforge exec` uses it to skip the manager (30 ms of imports: drivers, the library,
    planning). None whenever the row is not plainly a running VM with an agent: then the
    manager looks, reconciles and explains. A VM whose process died is found out when the
    connection is refused, and goes the manager's way too.
    """
    import json
    import sqlite3

    from ..locations import agent_address, data_root
    db = os.path.join(data_root(), "state.db")
    if any(c in db for c in "?#%") or not os.path.exists(db):
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] != _STATE_SCHEMA:
                return None
            row = conn.execute("SELECT state, runtime, spec FROM vms WHERE name=?",
                               (name,)).fetchone()
        finally:
            conn.close()
        if row is None or row[0] != "running" or not row[1]:
            return None
        agent = json.loads(row[1]).get("agent") or {}
        spec = json.loads(row[2]).get("spec") or {}
        if (spec.get("agent") or {}).get("enabled", True) is False:
            return None
        kind, path = agent.get("kind"), agent.get("path")
        if kind == "unix" and path:
            return agent_address(kind, str(path))
        if kind == "vsock":
            return agent_address(kind, cid=int(agent["cid"]), port=int(agent["port"]))
        if kind == "hybrid-vsock" and path:
            return agent_address(kind, str(path), port=int(agent["port"]))
    except (sqlite3.Error, ValueError, TypeError, KeyError, AttributeError):
        return None
    return None


def exec_command(m: VmManager | Callable[[], VmManager], name: str, command: Sequence[str], *,
                 interactive: bool = False, tty: bool = False, env: Sequence[str] = (),
                 cwd: str | None = None, timeout: float | None = None, shell: bool = False,
                 endpoint: str | None = None) -> int:
    """Run ``command`` in the guest, streaming its output; returns the exit status to use.

    ``m`` may be a function that makes the manager: with ``endpoint`` (quick_agent_endpoint)
    it is called only if that agent cannot be reached."""
    from ..errors import SpecError

    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command and not tty:
        raise SpecError("give the command to run after the VM's name",
                        field="COMMAND", hint=f"vmforge exec {name} -- uname -a")
    environ = {}
    for item in env:
        k, sep, v = item.partition("=")
        if not sep:
            raise SpecError(f"--env {item!r} is not KEY=VALUE", field="--env")
        environ[k] = v

    def manager() -> VmManager:
        return m() if callable(m) else m

    if tty:
        from .shell import run_terminal
        return run_terminal(manager(), name, command, shell=shell, env=environ or None, cwd=cwd,
                            timeout=timeout)

    def show(stream: str, chunk: bytes) -> None:
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        target.write(chunk)
        target.flush()

    def queued(msg: str) -> None:
        sys.stderr.write(msg + "\n")

    res: Any = None
    try:
        if endpoint is not None and not interactive:  # blocking, without asyncio's 35 ms
            from ..agent.quick import exec_once
            res = exec_once(endpoint, command, shell=shell, env=environ or None, cwd=cwd,
                            timeout=timeout, on_output=show)
        if res is None:
            res = _exec_async(manager, name, endpoint, command, interactive=interactive,
                              shell=shell, env=environ or None, cwd=cwd, timeout=timeout,
                              show=show, queued=queued)
    except BrokenPipeError:  # `vmforge exec vm -- yes | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if res.timed_out:
        sys.stderr.write(f"timed out after {timeout}s (killed with signal {res.signal})\n")
        return 124
    if res.signal:
        return 128 + int(res.signal)
    return int(res.exit_code or 0)


def _exec_async(manager: Callable[[], VmManager], name: str, endpoint: str | None,
                command: list[str], *, interactive: bool, shell: bool,
                env: dict[str, str] | None, cwd: str | None, timeout: float | None,
                show: Callable[[str, bytes], None], queued: Callable[[str], None]) -> Any:
    """exec through the asyncio client: stdin streamed (-i), a busy channel queued for, or
    the manager asked (a VM found in the state database, or one whose quick connection
    failed)."""
    import asyncio
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def session() -> AsyncIterator[AgentClient]:
        if endpoint is not None:
            from ..agent.client import AgentClient
            from ..errors import AgentError
            client = AgentClient(endpoint, on_queued=queued)
            try:
                await client.connect(timeout=0.5)
            except (OSError, AgentError):
                await client.close()
            else:
                try:
                    yield client
                finally:
                    await client.close()
                return
        async with manager().agent(name, on_queued=queued) as c:
            yield c

    async def go() -> Any:
        async with session() as c:
            if interactive and "stdin_stream" in await c.features():  # stdin as it is read
                from ..agent.terminal import attach
                return await attach(await c.start_exec(
                    command, shell=shell, env=env, cwd=cwd, timeout=timeout,
                    on_output=show), sys.stdin.fileno())
            data = sys.stdin.buffer.read() if interactive else None
            return await c.exec(command, shell=shell, env=env, cwd=cwd,
                                stdin=data, timeout=timeout, on_output=show)
    return asyncio.run(go())


# ---------------------------------------------------------------------------- ls

_STATE_COLOUR = {"running": "32", "crashed": "31", "broken": "31", "stopped": "2"}


def ls_command(m: VmManager, *, json_out: bool = False, show_secrets: bool = False) -> int:
    recs = m.vms()
    if json_out:
        import json
        data = [m.describe(r, show_secrets=show_secrets) if r.host_nics()
                else r.as_dict(show_secrets=show_secrets) for r in recs]
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return 0
    now = time.time()
    head = ("NAME", "STATE", "BACKEND", "CPUS", "MEMORY", "ACCEL", "PID", "IPV4", "BOOT", "AGE")
    rows = []
    for r in recs:
        # the stored spec as plain data: parsing it (pydantic) would double the command's time
        s = r.stored.get("spec") if r.state.value != "broken" else None
        s = s if isinstance(s, dict) else {}
        rows.append((r.name, r.state.value, r.backend.value, str(s.get("cpu_cores", "-")),
                     f"{s['memory_mib']} MiB" if "memory_mib" in s else "-", r.accel or "-",
                     str(r.pid or "-"), ", ".join(r.ipv4) or "-",
                     f"{r.boot_seconds:.2f}s" if r.boot_seconds else "-",
                     _age(now - r.created_at)))
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(head)]
    colour = _colour(sys.stdout)
    lines = ["  ".join(("\033[1m" + c + "\033[0m" if colour else c).ljust(
        w + (8 if colour else 0)) for c, w in zip(head, widths, strict=True)).rstrip()]
    for row in rows:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
            text = cell.ljust(w)
            if colour and i == 1:
                text = f"\033[{_STATE_COLOUR.get(cell, '33')}m{text}\033[0m"
            cells.append(text)
        lines.append("  ".join(cells).rstrip())
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------------------- seed build

def seed_build_command(output: str | os.PathLike[str], user_data: str | os.PathLike[str], *,
                       meta_data: str | os.PathLike[str] | None = None,
                       network_config: str | os.PathLike[str] | None = None,
                       vendor_data: str | os.PathLike[str] | None = None,
                       fmt: str = "iso", hostname: str = "vmforge", schema: bool = True) -> int:
    """Build a NoCloud seed (like cloud-localds), validated first. (Paths as given: pathlib
    alone costs this command 3 ms of imports.)"""
    from ..errors import SpecError
    from ..seed.build import Seed, _meta_data
    from ..seed.validate import validate_network_config, validate_user_data
    from ..seed.writers import write_seed_file

    def read(p: str | os.PathLike[str] | None, field: str) -> bytes | None:
        if p is None:
            return None
        try:
            with open(p, "rb") as f:
                return f.read()
        except OSError as exc:
            raise SpecError(f"cannot read {p}: {exc.strerror}", field=field) from None

    ud = read(user_data, "--user-data") or b""
    validate_user_data(ud, "--user-data", schema=schema)
    md = read(meta_data, "--meta-data")
    nc = read(network_config, "--network-config")
    if nc is not None:
        validate_network_config(nc.decode(), "--network-config", schema=schema)
    vd = read(vendor_data, "--vendor-data")
    if vd is not None:
        validate_user_data(vd, "--vendor-data", schema=schema)
    seed = Seed(_meta_data(md.decode() if md else None, hostname, "--meta-data"), ud, nc, vd)
    write_seed_file(seed, output, fmt)
    sys.stdout.write(f"wrote {output} ({fmt}, label cidata)\n")
    return 0


# ---------------------------------------------------------------------------- dispatch

def _take(args: list[str], i: int) -> str:
    if i + 1 >= len(args):
        raise _Fallback
    return args[i + 1]


_EXEC_VALUED = {"-e": "env", "--env": "env", "-w": "cwd", "--cwd": "cwd",
                "--timeout": "timeout"}


def _parse_exec(args: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"env": []}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        a = args[i]
        if a in ("-i", "--interactive"):
            opts["interactive"] = True
        elif a in ("-t", "--tty"):
            opts["tty"] = True
        elif a in ("-it", "-ti"):
            opts["interactive"] = opts["tty"] = True
        elif a == "--shell":
            opts["shell"] = True
        elif a.partition("=")[0] in _EXEC_VALUED:
            key, eq, value = a.partition("=")
            if not eq:
                value = _take(args, i)
                i += 1
            name = _EXEC_VALUED[key]
            if name == "env":
                opts["env"].append(value)
            elif name == "cwd":
                opts["cwd"] = value
            else:
                try:
                    opts["timeout"] = float(value)
                except ValueError:
                    raise _Fallback from None
        else:
            raise _Fallback  # --help, a typo: typer explains
        i += 1
    if i >= len(args) or args[i].startswith("-"):
        raise _Fallback
    opts["name"] = args[i]
    opts["command"] = args[i + 1:]
    return opts


def _parse_flags(args: list[str], flags: dict[str, str]) -> dict[str, bool]:
    out = dict.fromkeys(flags.values(), False)
    for a in args:
        if a not in flags:
            raise _Fallback
        out[flags[a]] = True
    return out


def _parse_seed_build(args: list[str]) -> dict[str, Any]:
    valued = {"--user-data": "user_data", "--meta-data": "meta_data",
              "--network-config": "network_config", "--vendor-data": "vendor_data",
              "--format": "fmt", "--hostname": "hostname"}
    opts: dict[str, Any] = {}
    positional = []
    i = 0
    while i < len(args):
        a = args[i]
        key, eq, value = a.partition("=")
        if key in valued:
            if not eq:
                value = _take(args, i)
                i += 1
            opts[valued[key]] = value
        elif a == "--no-schema-check":
            opts["schema"] = False
        elif a.startswith("-"):
            raise _Fallback
        else:
            positional.append(a)
        i += 1
    if len(positional) != 1 or "user_data" not in opts:
        raise _Fallback
    return {"output": positional[0], **opts}


def dispatch(argv: list[str]) -> int | None:
    """Run ``argv`` if it is one of the fast commands; None to hand it to typer."""
    if not argv:
        return None
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "exec":
            opts = _parse_exec(rest)
            name = opts.pop("name")
            if os.environ.get("VMFORGE_HOST") or opts.get("tty"):
                return exec_command(_manager(command="exec"), name, opts.pop("command"), **opts)
            return exec_command(lambda: _manager(command="exec"), name, opts.pop("command"),
                                endpoint=quick_agent_endpoint(name), **opts)
        if cmd in ("ls", "list"):
            return ls_command(_manager(command="ls"), **_parse_flags(
                rest, {"--json": "json_out", "--show-secrets": "show_secrets"}))
        if cmd == "seed" and rest[:1] == ["build"]:
            opts = _parse_seed_build(rest[1:])
            if os.environ.get("VMFORGE_HOST"):
                from .remote import local_only
                refused = local_only("seed build")
                assert refused is not None
                return report(refused)
            return seed_build_command(**opts)
    except _Fallback:
        return None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - vmforge's own errors are reported, others raise
        return report(exc)
    return None
