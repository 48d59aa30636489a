"""The one exception tree of vmforge.

::

    VmforgeError                      anything vmforge raises on purpose
    ├── SpecError                     a spec, recipe or input file is invalid (names the field)
    ├── SeedError                     cloud-init seed content is invalid (line/column when known)
    ├── ImageError                    image library, qcow2 or download problems
    │   └── ChecksumError             downloaded/imported bytes do not match the expected sha256
    ├── BuildError                    an image builder failed
    ├── HostError                     the host lacks something (a binary, firmware, KVM)
    ├── CommandError                  a child process failed (argv, exit code, stderr)
    ├── VmError                       lifecycle problems
    │   ├── VmNotFound
    │   ├── VmExists
    │   ├── InvalidState              the operation does not fit the VM's current state
    │   └── LaunchError               the hypervisor did not start (command, exit, console tail)
    ├── AgentError                    guest agent problems
    │   ├── FramingError              malformed bytes on the agent channel
    │   ├── AgentTimeout
    │   ├── AgentBusy                 the channel stayed busy past the queue's bound
    │   └── RemoteError               the guest reported an error for a call
    └── ProvisionError                a provisioning step failed (step, output)

The library raises; only ``vmforge.cli`` prints and exits.
"""

from __future__ import annotations

from collections.abc import Sequence


class VmforgeError(Exception):
    """Base class; ``hint`` says how to fix the problem when we know."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class SpecError(VmforgeError):
    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None):
        super().__init__(f"{field}: {message}" if field else message, hint=hint)
        self.field = field


class SeedError(SpecError):
    pass


class ImageError(VmforgeError):
    pass


class ChecksumError(ImageError):
    pass


class BuildError(VmforgeError):
    pass


class HostError(VmforgeError):
    exit_code = 3


class CommandError(VmforgeError):
    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, *,
                 hint: str | None = None, what: str | None = None) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        status = "timed out" if returncode is None else f"exited with {returncode}"
        msg = f"{what or argv[0]} {status}: {' '.join(argv)}"
        if tail:
            msg += f"\n{tail}"
        super().__init__(msg, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class VmError(VmforgeError):
    pass


class VmNotFound(VmError):
    exit_code = 4


class VmExists(VmError):
    exit_code = 5


class InvalidState(VmError):
    exit_code = 6


class LaunchError(VmError):
    def __init__(self, message: str, *, argv: Sequence[str] = (), returncode: int | None = None,
                 console_tail: str = "", hint: str | None = None) -> None:
        full = message
        if returncode is not None:
            full += f" (exit code {returncode})"
        if console_tail.strip():
            full += "\n--- console tail ---\n" + console_tail.rstrip()
        super().__init__(full, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.console_tail = console_tail


class AgentError(VmforgeError):
    pass


class FramingError(AgentError):
    pass


class AgentTimeout(AgentError):
    exit_code = 124


class AgentBusy(AgentError):
    """The agent channel stayed in use by other sessions past the queue's bound."""
    exit_code = 75  # EX_TEMPFAIL: try again later


class RemoteError(AgentError):
    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(f"guest: {message}")
        self.kind = kind


class ProvisionError(VmforgeError):
    def __init__(self, step: str, message: str, output: str = "") -> None:
        full = f"provision step {step!r} failed: {message}"
        if output.strip():
            full += "\n--- output ---\n" + output.rstrip()[-4000:]
        super().__init__(full)
        self.step = step
        self.output = output
