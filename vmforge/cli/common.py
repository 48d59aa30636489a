"""Shared CLI plumbing: consoles, the manager, error reporting, JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import typer
from rich.console import Console

if TYPE_CHECKING:
    from ..events import Event
    from ..node.manager import VmManager

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

_state: dict[str, Any] = {"data_dir": None, "verbose": False, "host": None,
                         "token_file": None}


def set_options(data_dir: Path | None, verbose: bool, *, host: str | None = None,
                token_file: Path | None = None) -> None:
    """The global options; ``host`` (``--host`` / ``VMFORGE_HOST``): talk to that daemon."""
    _state["data_dir"] = data_dir
    _state["verbose"] = verbose
    _state["host"] = host or None
    _state["token_file"] = token_file


def _command() -> tuple[str, dict[str, Any]]:
    """The running command's words after ``vmforge`` (``image build minimal``) and its
    parameters, from click's context ("" and {} outside one)."""
    import importlib
    try:  # newer typer carries its own copy of click
        globs: Any = importlib.import_module("typer._click.globals")
    except ImportError:
        globs = importlib.import_module("click.globals")
    ctx = globs.get_current_context(silent=True)
    if ctx is None:
        return "", {}
    params = dict(ctx.params)
    words = []
    while ctx is not None and ctx.parent is not None:
        words.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(words)), params


def manager() -> VmManager:
    """The local manager, or with ``--host`` / ``VMFORGE_HOST`` a
    :class:`~vmforge.cli.remote.RemoteManager` with the same interface for the commands."""
    if _state["host"]:
        from .remote import RemoteManager, local_only
        command, params = _command()
        if (exc := local_only(command)) is not None:
            raise exc
        return cast("VmManager", RemoteManager(_state["host"], token_file=_state["token_file"],
                                               command=command, params=params))
    from ..node.manager import VmManager
    from ..paths import DataDir

    d = _state["data_dir"]
    return VmManager(DataDir(d) if d else None)


def fail(exc: Exception) -> NoReturn:
    from ..errors import VmforgeError

    if isinstance(exc, VmforgeError):
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, markup=True,
                  soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
        raise typer.Exit(exc.exit_code)
    raise exc


@contextmanager
def errors_reported() -> Iterator[None]:
    from ..errors import VmforgeError

    try:
        if _state["host"]:  # a command that works on this machine only says so at once
            from .remote import local_only
            if (refused := local_only(_command()[0])) is not None:
                raise refused
        yield
    except VmforgeError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


class Reporter:
    """Shows progress: takes the library's typed events and the builders' plain text."""

    def __init__(self, show: Callable[[str], None]) -> None:
        self._show = show

    def __call__(self, msg: str | Event) -> None:
        self._show(msg if isinstance(msg, str) else msg.message)


@contextmanager
def progress(title: str) -> Iterator[Reporter]:
    """A spinner on stderr whose text follows the work; plain lines when not a terminal."""
    if not err.is_terminal:
        yield Reporter(lambda msg: err.print(f"[dim]{title}: {msg}[/]", highlight=False))
        return
    with err.status(title) as status:
        yield Reporter(lambda msg: status.update(f"{title}: {msg}"))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
