"""`vmforge shell VM`: an interactive login shell in the guest on a pseudo-terminal, over the
agent (no SSH). :func:`run_terminal` is also the terminal half of `vmforge exec -t`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from .common import err, errors_reported, manager
from .complete import VmName

if TYPE_CHECKING:
    from ..agent.client import ExecResult
    from ..node.manager import VmManager

__all__ = ["register_shell", "run_terminal", "exit_status"]


def register_shell(app: typer.Typer) -> None:
    app.command("shell")(shell_cmd)


def shell_cmd(
    name: VmName,
    user: Annotated[str | None, typer.Option(
        "--user", "-u", help="Guest user (name or uid); default: the agent's (root).")] = None,
) -> None:
    """Open an interactive login shell in the VM: its own terminal (window size follows
    yours, Ctrl-C goes to the guest), no SSH; exits with the shell's exit code."""
    with errors_reported():
        code = run_terminal(manager(), name, [], login=True, user=user)
    raise typer.Exit(code)


def exit_status(res: ExecResult, timeout: float | None = None) -> int:
    """The guest command's outcome as this process's exit status (as a shell reports it)."""
    if res.timed_out:
        err.print(f"timed out after {timeout}s (killed with signal {res.signal})")
        return 124
    if res.signal:
        return 128 + res.signal
    return res.exit_code or 0


def run_terminal(m: VmManager, name: str, argv: list[str], *, login: bool = False,
                 user: str | None = None, shell: bool = False,
                 env: dict[str, str] | None = None, cwd: str | None = None,
                 timeout: float | None = None) -> int:
    """Run ``argv`` (or, with ``login``, the user's login shell) on a terminal in the guest,
    attached to this process's terminal; returns the exit status to exit with."""
    import asyncio
    import os

    from ..agent.terminal import attach, raw_mode, terminal_size, writer

    stdin_fd, stdout_fd = 0, 1
    resize_fd = stdout_fd if os.isatty(stdout_fd) else stdin_fd

    async def go() -> ExecResult:
        async with m.agent(name, on_queued=lambda msg: err.print(msg, highlight=False)) as c:
            rows, cols = terminal_size((stdout_fd, stdin_fd, 2))
            session = await c.start_exec(argv, tty=True, rows=rows, cols=cols,
                                         term=os.environ.get("TERM"), login=login, user=user,
                                         shell=shell, env=env, cwd=cwd, timeout=timeout,
                                         on_output=writer(stdout_fd))
            with raw_mode(stdin_fd):
                return await attach(session, stdin_fd, resize_fd=resize_fd)

    return exit_status(asyncio.run(go()), timeout)
