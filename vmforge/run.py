"""The only place in vmforge that starts processes.

Every child gets an argv list (never a shell), stdin closed unless we feed it, a fixed
environment, a debug log line with secrets redacted, and is killed if we fail while it runs.
Failures raise :class:`CommandError` carrying argv, exit code and stderr.

Unit tests install a guard (``set_guard``) so that a test which is not allowed to start
processes fails loudly instead of quietly depending on the host.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandError, HostError

__all__ = ["Completed", "run", "find_binary", "require_binary", "set_guard"]

log = logging.getLogger("vmforge.run")

_SECRET = re.compile(r"(password|passwd|secret|token|key)=([^,\s]+)", re.IGNORECASE)
_BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}

_guard: Callable[[Sequence[str]], None] | None = None


def set_guard(guard: Callable[[Sequence[str]], None] | None) -> None:
    """Install a callable that is consulted (and may raise) before any process starts."""
    global _guard
    _guard = guard


def _check(argv: Sequence[str]) -> None:
    if _guard is not None:
        _guard(argv)


def redact(argv: Sequence[str]) -> str:
    return " ".join(_SECRET.sub(r"\1=***", a) for a in argv)


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(_BASE_ENV)
    for key in ("HOME", "TMPDIR", "USER"):
        if key in os.environ:
            env[key] = os.environ[key]
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True,
        timeout: float | None = None, env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None, what: str | None = None,
        hint: str | None = None) -> Completed:
    """Run a command to completion and capture its output."""
    argv = [str(a) for a in argv]
    _check(argv)
    log.debug("run: %s", redact(argv))
    try:
        proc = subprocess.run(
            argv, input=input, stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=timeout, env=_env(env), cwd=cwd, check=False)
    except FileNotFoundError as exc:
        raise HostError(f"{argv[0]} is not installed", hint=hint or "run `vmforge doctor`") from exc
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise CommandError(argv, None, err, what=what, hint=hint) from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"),
                           what=what, hint=hint)
    return Completed(argv, proc.returncode, proc.stdout, proc.stderr)


def find_binary(name: str) -> str | None:
    return shutil.which(name, path=_BASE_ENV["PATH"] + ":" + os.environ.get("PATH", ""))


def require_binary(name: str, package: str) -> str:
    path = find_binary(name)
    if path is None:
        raise HostError(f"{name} not found", hint=f"apt-get install {package}")
    return path


# -- long-lived processes that outlive us ------------------------------------------------------

def spawn_detached(argv: Sequence[str], *, log: str | Path, pidfile: str | Path,
                   env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> int:
    """Start a process that runs on after we exit (Cloud Hypervisor and Firecracker do not
    daemonize themselves, unlike QEMU's ``-daemonize``) and return its pid.

    The child gets its own session (a Ctrl-C at our terminal does not reach it), stdin from
    /dev/null, stdout and stderr appended to ``log`` (owner-only), and the fixed environment.
    ``cwd``: its working directory (relative paths in its configuration resolve there).
    Its pid is in ``pidfile`` (written atomically) before this returns; if that fails the
    child is killed. While we live, a daemon thread reaps it when it exits (no zombie looks
    alive to a pid check); once we exit, init adopts it.
    """
    import signal
    import threading

    argv = [str(a) for a in argv]
    _check(argv)
    logging.getLogger(__name__).debug("spawn: %s", redact(argv))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                env=_env(env), start_new_session=True, close_fds=True,
                                cwd=cwd)
    except FileNotFoundError as exc:
        raise HostError(f"{argv[0]} is not installed", hint="run `vmforge doctor`") from exc
    except OSError as exc:
        raise CommandError(argv, None, str(exc), what=Path(argv[0]).name) from exc
    finally:
        os.close(fd)
    try:
        tmp = Path(f"{pidfile}.tmp")
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, pidfile)
    except BaseException:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return proc.pid


__all__ += ["spawn_detached"]
