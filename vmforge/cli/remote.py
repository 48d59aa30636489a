"""The CLI against a node daemon: ``vmforge --host unix:///path/vmforge.sock ...`` or
``VMFORGE_HOST=https://node:PORT vmforge ...`` (as ``docker -H`` does).

:class:`RemoteManager` has the part of :class:`~vmforge.node.manager.VmManager` the CLI's
commands use, over :mod:`vmforge.client`, so that the commands themselves do not know whether
they talk to the local state file or to a daemon: the same output, the same exit codes. Its
records are :class:`~vmforge.node.manager.VmRecord` (a subclass that keeps the daemon's own
JSON for ``as_dict``); ``agent(name)`` gives an object with the agent client's methods the
commands call (exec, put_tree, get_tree, health), backed by the daemon's exec (NDJSON),
files and health endpoints. :class:`RemoteSnapshots` does `snapshot`, `clone`,
`run --from-snapshot` and `pool` through the daemon's snapshot and pool endpoints.

What does not make sense against a daemon (building images or seeds from local files, a
terminal session, host networks, the local doctor) fails at once with an error that names
``--host`` (:data:`LOCAL_ONLY`, exit code 2).

The token comes from ``$VMFORGE_TOKEN``, ``--token-file`` or ``$VMFORGE_TOKEN_FILE``; it is
sent as a bearer token and never printed. A refused token exits 77 (EX_NOPERM), a daemon that
cannot be reached 69 (EX_UNAVAILABLE).

Only imported when a host is given: the local fast paths never load httpx.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import AgentError, InvalidState, LaunchError, SpecError, VmforgeError, VmNotFound
from ..events import Event, Progress, no_progress
from ..hypervisors.base import Backend, Runtime, StopOutcome
from ..images.library import Image
from ..node.manager import VmRecord, redact_spec
from ..node.states import STARTABLE, VmState
from ..paths import VmPaths

if TYPE_CHECKING:
    from ..client import AsyncClient, Client, ClientExecResult
    from ..spec import VmRequest

__all__ = ["RemoteManager", "RemoteRecord", "RemoteAgent", "RemoteLibrary", "RemoteImage",
           "RemoteSnapshots", "LocalOnly", "DaemonUnreachable", "TokenRefused", "LOCAL_ONLY",
           "local_only", "record_from"]

# --------------------------------------------------------------------------- errors

_REMOTE = "--host / VMFORGE_HOST"

#: Commands that work on this machine only (by their words after ``vmforge``; a group's
#: name covers its subcommands), with how to do it instead.
LOCAL_ONLY: dict[str, str] = {
    "plan": "plan on the node itself (`vmforge plan` there), or without --host against this "
            "machine's library",
    "seed build": "a seed is a local file: run `vmforge seed build` without --host "
                  "(unset VMFORGE_HOST)",
    "image build": "build on the node, or through the API: POST /v1/images/build "
                   "(vmforge.client.Client.build)",
    "image pull": "pull on the node, or through the API: POST /v1/images/pull "
                  "(vmforge.client.Client.pull)",
    "image import": "import on the node, or through the API: PUT /v1/images/upload or "
                    "POST /v1/images/import",
    "image verify": "run `vmforge image verify` on the node",
    "image extract-kernel": "run `vmforge image extract-kernel` on the node",
    "launch": "on the node, `vmforge launch`; remotely, `vmforge run -f SPEC` with a spec "
              "that names the image",
    "shell": "the daemon's exec API streams output but gives no terminal yet: run "
             "`vmforge shell` on the node, or `vmforge exec NAME -- sh -c '...'` remotely",
    "timeline": "GET /v1/vms/NAME/timeline on the daemon gives it as JSON or SVG",
    "doctor": "GET /v1/host on the daemon gives the node's checks; `vmforge doctor` without "
              "--host checks this machine",
    "network": "manage host networks on the node itself",
}


class LocalOnly(VmforgeError, AttributeError):
    """A command (or a part of one) that needs this machine's state, not a daemon's.

    Also an AttributeError, so ``hasattr`` on a remote manager answers False for what it
    does not have."""

    exit_code = 2


class DaemonUnreachable(VmforgeError):
    exit_code = 69  # EX_UNAVAILABLE


class TokenRefused(VmforgeError):
    exit_code = 77  # EX_NOPERM


def local_only(command: str) -> LocalOnly | None:
    """The error for ``command`` (``"image build minimal"``) if it is local-only."""
    words = command.split()
    for key, hint in LOCAL_ONLY.items():
        k = key.split()
        if words[:len(k)] == k:
            return LocalOnly(f"`vmforge {command}` works on this machine only, not against "
                             f"a daemon ({_REMOTE} is set)", hint=hint)
    return None


def _not_here(what: str) -> LocalOnly:
    return LocalOnly(f"{what} is not available against a daemon ({_REMOTE} is set)",
                     hint="run it on the node itself, without --host")


_HINTS = ((re.compile(r"^POST /v1/vms/([^/\s]+)/start$"), r"`vmforge start \1`"),
          (re.compile(r"^GET /v1/images$"), "see `vmforge image ls`"),
          (re.compile(r"^GET /v1/pools$"), "see `vmforge pool ls`"))


def _cli_hint(hint: str | None) -> str | None:
    """The daemon's hints speak HTTP; the CLI's speak commands."""
    if hint:
        for pattern, repl in _HINTS:
            if pattern.match(hint):
                return pattern.sub(repl, hint)
    return hint


def _name(name: str) -> str:
    """A VM name as the daemon would accept it; anything else is a VM that does not exist
    (as locally), never a path in a URL."""
    from ..spec import NAME_RE
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise VmNotFound(f"no VM named {name!r}", hint="see `vmforge ls`")
    return name


# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class RemotePaths(VmPaths):
    """A remote VM's paths are the node's; the console log is fetched from the daemon into a
    local file when a command reads it."""
    fetch_console: Callable[[], Path] | None = field(default=None, compare=False, repr=False)

    @property
    def console(self) -> Path:
        return self.fetch_console() if self.fetch_console is not None else super().console


@dataclass(frozen=True)
class RemoteRecord(VmRecord):
    """A VM as the daemon describes it: a :class:`VmRecord` (the commands read the same
    attributes) whose ``as_dict`` is the daemon's own JSON, minus its links."""
    api: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    secrets: bool = False  # ``api`` came with user-data and vendor-data unredacted
    source: RemoteManager | None = field(default=None, compare=False, repr=False)

    @property
    def paths(self) -> VmPaths:
        if self.source is None:
            return VmPaths(self.dir)
        source, name = self.source, self.name
        return RemotePaths(self.dir, lambda: source.console_file(name))

    @property
    def ipv4(self) -> list[str]:
        return [str(a) for a in self.api.get("ipv4") or []]

    @property
    def agent_endpoint(self) -> str:
        return str(self.api.get("agent") or super().agent_endpoint)

    def as_dict(self, *, show_secrets: bool = False) -> dict[str, Any]:
        if show_secrets and not self.secrets and self.source is not None and \
                isinstance(self.api.get("spec"), dict):
            return self.source.get(self.name, show_secrets=True).as_dict(show_secrets=True)
        d = json.loads(json.dumps(self.api))  # a copy the caller may change
        if self.secrets and not show_secrets and isinstance(d.get("spec"), dict):
            d["spec"] = redact_spec(d["spec"])
        return dict(d)


_OUT_ONLY = ("links", "job")  # what the daemon adds to a record


def record_from(d: dict[str, Any], *, secrets: bool = False,
                source: RemoteManager | None = None) -> RemoteRecord:
    """The daemon's JSON for a VM (``VmOut``) as a record."""
    from ..client import DaemonError
    api = {k: v for k, v in d.items() if k not in _OUT_ONLY}
    try:
        state = VmState(api["state"])
        backend = Backend(api["backend"])
        name = str(api["name"])
        vm_dir = Path(api["dir"])
        created = float(api["created_at"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DaemonError(f"the daemon described a VM in a way this vmforge does not "
                          f"understand ({exc})",
                          hint="use the same vmforge version here and on the node") from None
    if state is VmState.BROKEN:  # as locally: a broken record has no spec
        for key in ("cpu_cores", "memory_mib", "spec"):
            if api.get(key) is None:
                api.pop(key, None)
    spec = api.get("spec")
    stored = {"name": name, "spec": spec} if isinstance(spec, dict) and \
        state is not VmState.BROKEN else {}
    runtime = None
    if isinstance(api.get("runtime"), dict):
        try:
            runtime = Runtime.from_json(json.dumps(api["runtime"]))
        except (KeyError, TypeError, ValueError):
            runtime = None

    def opt(key: str) -> float | None:
        v = api.get(key)
        return float(v) if isinstance(v, int | float) else None

    return RemoteRecord(name, state, stored, vm_dir, backend, runtime, created,
                        opt("started_at"), opt("ready_at"), opt("stopped_at"),
                        api.get("last_error"), api.get("stop_reason"), None,
                        api=api, secrets=secrets, source=source)


# --------------------------------------------------------------------------- images

@dataclass(frozen=True)
class RemoteImage(Image):
    """An image in the daemon's library; ``as_dict`` is the daemon's JSON. It has no local
    paths (``path()`` is None): what needs the file (qemu-img info) the daemon did."""
    api: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.api)
        if d.get("qemu_img") is None:
            d.pop("qemu_img", None)
        for key in ("used_by_vms", "child_images", "lineage"):
            d.pop(key, None)
        return d


def image_from(d: dict[str, Any]) -> RemoteImage:
    return RemoteImage(int(d["id"]), str(d["name"]), int(d["version"]), str(d["kind"]),
                       d.get("format"), dict(d.get("files") or {}), d.get("cmdline"),
                       d.get("parent_id"), d.get("source"), d.get("recipe"),
                       int(d.get("size") or 0), d.get("virtual_size"),
                       float(d.get("created_at") or 0), api=dict(d))


class RemoteLibrary:
    """The part of :class:`~vmforge.images.library.Library` that `vmforge image ls | inspect
    | rm | prune` use, over the daemon's ``/v1/images``."""

    def __init__(self, manager: RemoteManager) -> None:
        self._m = manager

    def all(self) -> list[Image]:
        with self._m.mapped():
            return [image_from(d) for d in self._m.client.images()]

    def find(self, ref: str) -> Image | None:
        try:
            return self.resolve(ref)
        except VmforgeError as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise

    def resolve(self, ref: str, field: str = "image") -> Image:
        from ..images.library import parse_ref
        parse_ref(ref)  # a malformed reference is refused as locally
        with self._m.mapped():
            return image_from(self._m.client.image(ref))

    def users(self, image: Image) -> tuple[list[str], list[str]]:
        api = self._full(image)
        return list(api.get("used_by_vms") or []), list(api.get("child_images") or [])

    def lineage(self, image: Image) -> list[str]:
        return list(self._full(image).get("lineage") or [])

    def _full(self, image: Image) -> dict[str, Any]:
        api = image.api if isinstance(image, RemoteImage) else {}
        if "lineage" not in api:
            with self._m.mapped():
                api = self._m.client.image(image.ref)
        return api

    def remove(self, ref: str) -> Image:
        self.resolve(ref)
        with self._m.mapped():
            return image_from(self._m.client.remove_image(ref))

    def prune(self) -> list[str]:
        with self._m.mapped():
            return self._m.client.prune()

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("_"):
            raise AttributeError(attr)
        raise local_only(self._m.command) or _not_here(f"the image library's {attr}")


# --------------------------------------------------------------------------- the agent

# Run in the guest by its own python3 (the agent is a Python program, so there is one):
# what the agent's mkdir and list_tree calls do, which the daemon's API does not expose.
_GUEST_TREE = r"""
import json, os, sys
op, arg = sys.argv[1], json.load(sys.stdin)
def absolute(p):
    if not isinstance(p, str) or not p.startswith("/"):
        raise ValueError("path must be absolute: %r" % (p,))
    return os.path.normpath(p)
if op == "mkdirs":
    for p, mode in arg:
        os.makedirs(absolute(p), mode=mode, exist_ok=True)
    out = {}
else:
    root = absolute(arg)
    entries = []
    if os.path.isdir(root):
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for d in sorted(dirnames):
                p = os.path.join(dirpath, d)
                entries.append({"path": os.path.normpath(os.path.join(rel, d)), "type": "dir",
                                "mode": os.stat(p).st_mode & 0o7777})
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                entries.append({"path": os.path.normpath(os.path.join(rel, name)),
                                "type": "file", "mode": os.stat(p).st_mode & 0o7777})
    out = {"root": root, "is_dir": os.path.isdir(root), "entries": entries}
sys.stdout.write(json.dumps(out))
"""


def _local_error(what: str, path: Path, exc: OSError) -> AgentError:
    hint = {errno.ENOENT: "check the path (and that its directory exists)",
            errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.ENOSPC: "the host disk is full: free some space",
            errno.EISDIR: "name a file, or copy the directory as a whole"}.get(exc.errno or 0)
    return AgentError(f"{what} {path}: {exc.strerror or exc}", hint=hint)


def _absolute(remote: str) -> str:
    if not remote.startswith("/"):
        raise AgentError(f"guest path must be absolute: {remote!r}")
    return remote


class RemoteAgent:
    """The agent client's methods the commands call, through the daemon."""

    def __init__(self, manager: RemoteManager, client: AsyncClient, name: str) -> None:
        self._m = manager
        self._c = client
        self.name = name

    async def features(self) -> set[str]:
        return set()  # no stdin streaming, no terminal over the daemon's exec (yet)

    async def exec(self, argv: list[str], *, shell: bool = False,
                   env: dict[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None,
                   on_output: Callable[[str, bytes], Any] | None = None) -> ClientExecResult:
        """Output as it comes (``on_output``), then the result; a command the guest could not
        run is an error, as locally (the daemon reports it on the stream's last line)."""
        from ..client.http import error_from
        with self._m.mapped():
            res = await self._c.exec(self.name, list(argv), shell=shell, env=env, cwd=cwd,
                                     stdin=stdin, timeout=timeout, on_output=on_output)
            if res.error:
                raise error_from(int(res.error.get("status") or 0), res.error)
        return res

    async def start_exec(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise LocalOnly(f"a terminal session (`vmforge shell`, `vmforge exec -t`) is not "
                        f"available against a daemon ({_REMOTE} is set)",
                        hint=LOCAL_ONLY["shell"])

    async def health(self, checks: list[dict[str, Any]] | None = None,
                     timeout: float = 60) -> dict[str, Any]:
        """The daemon runs the VM's own (stored) health checks: ``checks`` are the same."""
        with self._m.mapped():
            return await self._c.health(self.name, timeout=timeout)

    async def put_file(self, local: str | Path, remote: str, *,
                       mode: int | None = None) -> dict[str, Any]:
        local = Path(local)
        _absolute(remote)
        try:
            with open(local, "rb"):
                pass
        except OSError as exc:
            raise _local_error("cannot read", local, exc) from exc
        with self._m.mapped():
            try:
                return await self._c.put_file(self.name, local, remote, mode=mode)
            except OSError as exc:
                raise _local_error("cannot read", local, exc) from exc

    async def get_file(self, remote: str, local: str | Path) -> dict[str, Any]:
        local = Path(local)
        _absolute(remote)
        with self._m.mapped():
            try:
                res = await self._c.get_file(self.name, remote, local)
                if res.get("mode") is not None:
                    os.chmod(local, int(res["mode"]))
            except OSError as exc:
                raise _local_error("cannot write", Path(exc.filename or local), exc) from exc
        return res

    async def _tree(self, op: str, arg: Any) -> dict[str, Any]:
        res = await self.exec(["python3", "-S", "-c", _GUEST_TREE, op],
                              stdin=json.dumps(arg).encode(), timeout=600)
        if res.exit_code != 0:
            lines = res.stderr.decode(errors="replace").strip().splitlines()
            raise AgentError(f"guest: {lines[-1] if lines else f'exit code {res.exit_code}'}")
        return dict(json.loads(res.stdout))

    async def put_tree(self, local: str | Path, remote: str) -> int:
        """As the agent client's: a file, or a directory with its modes, file by file."""
        local = Path(local)
        if not local.exists():
            raise _local_error("cannot read", local,
                               FileNotFoundError(errno.ENOENT, "No such file or directory"))
        if local.is_file():
            await self.put_file(local, remote)
            return 1
        _absolute(remote)
        dirs: list[tuple[str, int]] = []
        files: list[tuple[Path, str]] = []
        try:
            dirs.append((remote, local.stat().st_mode & 0o7777))
            for dirpath, dirnames, filenames in os.walk(local):
                rel = Path(dirpath).relative_to(local)
                for d in sorted(dirnames):
                    dirs.append((f"{remote}/{rel / d}".replace("/./", "/"),
                                 (Path(dirpath) / d).stat().st_mode & 0o7777))
                for fname in sorted(filenames):
                    src = Path(dirpath) / fname
                    if src.is_file() and not src.is_symlink():
                        files.append((src, f"{remote}/{rel / fname}".replace("/./", "/")))
        except OSError as exc:
            raise _local_error("cannot read", Path(exc.filename or local), exc) from exc
        await self._tree("mkdirs", dirs)
        for src, dest in files:
            await self.put_file(src, dest)
        return len(files)

    async def get_tree(self, remote: str, local: str | Path) -> int:
        local = Path(local)
        tree = await self._tree("list_tree", _absolute(remote))
        if not tree["is_dir"]:
            await self.get_file(remote, local)
            return 1
        count = 0
        try:
            local.mkdir(parents=True, exist_ok=True)
            for entry in tree["entries"]:
                dest = local / entry["path"]
                if entry["type"] == "dir":
                    dest.mkdir(parents=True, exist_ok=True)
                    dest.chmod(entry["mode"])
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    await self.get_file(f"{tree['root']}/{entry['path']}", dest)
                    count += 1
        except OSError as exc:
            raise _local_error("cannot write", Path(exc.filename or local), exc) from exc
        return count

    async def boot_timing(self) -> NoReturn:
        raise LocalOnly(f"the guest's boot timing is not available against a daemon "
                        f"({_REMOTE} is set)", hint=LOCAL_ONLY["timeline"])

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("_"):
            raise AttributeError(attr)
        raise _not_here(f"the guest agent's {attr!r}")


# --------------------------------------------------------------------------- the manager

_JOB_POLL = 0.2


class RemoteManager:
    """The CLI's manager when ``--host`` / ``VMFORGE_HOST`` is set."""

    def __init__(self, host: str, *, token_file: str | Path | None = None, command: str = "",
                 params: dict[str, Any] | None = None) -> None:
        self.host = host
        self.token_file = token_file
        self.command = command
        self.params = dict(params or {})
        # VM -> the daemon's job bringing it up, and the progress already shown
        self._jobs: dict[str, tuple[str, set[tuple[Any, ...]]]] = {}
        self._consoles: dict[str, Path] = {}
        self._tmp: Path | None = None
        with self.mapped():
            self.client: Client = self._new_client()
        self.library = RemoteLibrary(self)

    def _new_client(self) -> Client:
        from ..client import Client
        return Client(self.host, token_file=self.token_file, timeout=120)

    def _aclient(self) -> AsyncClient:
        from ..client import AsyncClient
        with self.mapped():
            return AsyncClient(self.host, token_file=self.token_file, timeout=120)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteManager({self.client.host!r})"  # never the token

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("_"):
            raise AttributeError(attr)
        raise local_only(self.command) or _not_here(
            f"`vmforge {self.command}`" if self.command else f"the manager's {attr!r}")

    # -- errors
    @contextmanager
    def mapped(self) -> Iterator[None]:
        """The client's errors as the CLI reports them: a refused token and an unreachable
        daemon with their own exit codes, hints that name commands."""
        import httpx

        from ..client import DaemonError
        try:
            yield
        except DaemonError as exc:
            if exc.status == 401:
                client = self.__dict__.get("client")
                sent = client is not None and "Authorization" in client.headers
                hint = ("set VMFORGE_TOKEN, or --token-file / VMFORGE_TOKEN_FILE, to the "
                        "content of the daemon's --token-file (a unix socket needs none)")
                if os.environ.get("VMFORGE_TOKEN") and (
                        self.token_file or os.environ.get("VMFORGE_TOKEN_FILE")):
                    hint += "; VMFORGE_TOKEN is set, and it goes before a token file"
                raise TokenRefused(
                    f"the daemon at {self._where()} refused the request: "
                    + ("wrong token" if sent else "it needs a token"), hint=hint) from None
            if exc.status is None and exc.message.startswith(("cannot reach", "lost the")):
                raise DaemonUnreachable(exc.message, hint=exc.hint) from None
            exc.hint = _cli_hint(exc.hint)
            raise
        except VmforgeError as exc:
            exc.hint = _cli_hint(exc.hint)
            raise
        except httpx.HTTPError as exc:
            raise DaemonUnreachable(f"cannot reach the daemon at {self._where()}: {exc}",
                                    hint="is `vmforge serve` running?") from None

    def _where(self) -> str:
        return re.sub(r"//[^/@]*@", "//", self.host)  # no credentials in a message

    # -- records
    def vms(self) -> list[VmRecord]:
        with self.mapped():
            return [record_from(d, source=self) for d in self.client.vms()]

    def get(self, name: str, *, reconcile: bool = True, show_secrets: bool = False
            ) -> VmRecord:
        with self.mapped():
            d = self.client.get(_name(name), show_secrets=show_secrets)
        return record_from(d, secrets=show_secrets, source=self)

    def describe(self, rec: VmRecord, *, show_secrets: bool = False) -> dict[str, Any]:
        """``as_dict`` plus each NIC (as ``VmManager.describe``): the daemon's ``nics`` when
        it sends them, else worked out here from the stored spec. The NICs' host side (DHCP
        leases of the node's networks, the guest's report per NIC) is the node's to know:
        without it, a NIC on a host network shows no addresses of its own, and the VM's
        ``ipv4`` stays what the daemon said."""
        d = rec.as_dict(show_secrets=show_secrets)
        if "nics" in d or not rec.stored.get("spec", {}).get("nics"):
            return d
        from types import SimpleNamespace

        from ..node.manager import VmManager
        no_networks = SimpleNamespace(
            store=SimpleNamespace(find=lambda _name: None),
            leases_by_mac=lambda _names: {})
        shim: Any = SimpleNamespace(networks=no_networks)
        out = VmManager.describe(shim, rec, show_secrets=show_secrets)
        out["ipv4"] = d.get("ipv4", [])
        return out

    async def refresh_guest_net(self, name: str, timeout: float = 5.0) -> VmRecord:
        return self.get(name)  # the daemon's record says what the guest last reported

    # -- lifecycle
    def ensure_images(self, req: VmRequest, progress: Progress = no_progress) -> None:
        """The daemon builds the built-in images a spec names (on create)."""

    @staticmethod
    def _schema(schema_check: bool) -> None:
        if not schema_check:
            raise SpecError("not available against a daemon: it always checks cloud-init "
                            "data against cloud-init's schemas", field="--no-schema-check",
                            hint="drop --no-schema-check, or fix what the check reports")

    @staticmethod
    def _body(req: VmRequest, base_dir: Path | None) -> dict[str, Any]:
        """The request as the daemon takes it. Relative paths were made absolute by the
        spec's loader; provision ``copy`` sources are made absolute here (relative to the
        spec's directory, as ``run`` does locally). Paths name files on the node."""
        data: dict[str, Any] = req.model_dump(mode="json", by_alias=True,
                                              exclude_defaults=True)
        base = (base_dir or Path.cwd()).resolve()
        for step in data.get("spec", {}).get("provision") or []:
            copy = step.get("copy") if isinstance(step, dict) else None
            if isinstance(copy, list) and copy and not Path(copy[0]).is_absolute():
                step["copy"] = [str(base / copy[0]), *copy[1:]]
        return data

    def create(self, req: VmRequest, progress: Progress = no_progress, *,
               schema_check: bool = True) -> VmRecord:
        self._schema(schema_check)
        with self.mapped():
            d = self.client.create(self._body(req, None), start=False)
        progress(Event(req.name, "state", VmState.CREATED.value))
        return record_from(d, source=self)

    async def run(self, req: VmRequest, *, timeout: float = 180.0,
                  progress: Progress = no_progress, base_dir: Path | None = None,
                  keep_on_failure: bool = False, schema_check: bool = True) -> VmRecord:
        """create + start + ready + provision, on the daemon (as one job whose progress is
        shown); a VM that fails on the way, or is interrupted, is removed unless
        ``keep_on_failure``."""
        self._schema(schema_check)
        body = self._body(req, base_dir)
        async with self._aclient() as c:
            with self.mapped():
                d = await c.create(body, start=True, wait="none",
                                   timeout=min(max(timeout, 1.0), 3600.0),
                                   keep_on_failure=keep_on_failure)
            progress(Event(req.name, "state", VmState.CREATED.value))
            try:
                if d.get("job"):
                    await self._follow_job(c, str(d["job"]), progress)
                with self.mapped():
                    return record_from(await c.get(req.name), source=self)
            except BaseException:
                if not keep_on_failure:
                    with contextlib.suppress(Exception):  # best effort, interrupted too
                        await asyncio.wait_for(c.delete(req.name, force=True,
                                                        stop_timeout=0), 30)
                raise

    def start(self, name: str, progress: Progress = no_progress) -> VmRecord:
        """Returns once the hypervisor runs; the daemon goes on to wait for the agent and
        provision (a job that ``wait_ready`` follows)."""
        rec = self.get(name)
        if rec.state is VmState.BROKEN:
            raise InvalidState(f"VM {name} is broken: {rec.last_error}",
                               hint=f"`vmforge rm -f {name}` removes it")
        if rec.state not in STARTABLE:
            raise InvalidState(f"VM {name} is {rec.state.value}; this needs it to be "
                               + " or ".join(s.value for s in STARTABLE))
        timeout = self.params.get("timeout") if self.command == "start" else None
        with self.mapped():
            d = self.client.start(name, wait="none",
                                  timeout=min(max(float(timeout or 300), 1.0), 3600.0))
        if d.get("job"):
            job = str(d["job"])
            seen: set[tuple[Any, ...]] = set()
            self._jobs[name] = (job, seen)
            while True:
                with self.mapped():
                    snapshot = self.client.job(job)
                if self._job_step(snapshot, seen, progress, until_running=True):
                    break
                time.sleep(_JOB_POLL)
        return self.get(name)

    async def wait_ready(self, name: str, timeout: float = 180.0,
                         progress: Progress = no_progress) -> VmRecord:
        deadline = time.monotonic() + timeout
        async with self._aclient() as c:
            job = self._jobs.pop(name, None)
            if job is not None:  # its progress says "ready"
                await self._follow_job(c, job[0], progress, deadline=deadline, what=name,
                                       seen=job[1])
            else:
                await self._poll_ready(c, _name(name), deadline, timeout)
                progress(Event(name, "ready", "ready"))
            with self.mapped():
                return record_from(await c.get(name), source=self)

    async def _poll_ready(self, c: AsyncClient, name: str, deadline: float,
                          timeout: float) -> None:
        """For a VM this process did not start: ready once the daemon recorded it so, or its
        agent answers."""
        while True:
            with self.mapped():
                rec = record_from(await c.get(name), source=self)
            if rec.state is not VmState.RUNNING:
                raise InvalidState(f"VM {name} is {rec.state.value}, not running")
            if rec.ready_at and rec.started_at and rec.ready_at >= rec.started_at:
                return
            if rec.agent_enabled:
                try:
                    with self.mapped():
                        await c.health(name, timeout=5)
                    return
                except (VmNotFound, InvalidState, TokenRefused, DaemonUnreachable):
                    raise
                except VmforgeError:
                    pass
            if time.monotonic() > deadline:
                raise LaunchError(f"VM {name} did not become ready within {timeout:.0f}s",
                                  hint=f"see `vmforge console {name}`")
            await asyncio.sleep(0.5)

    @staticmethod
    def _job_step(job: dict[str, Any], seen: set[tuple[Any, ...]], progress: Progress,
                  *, until_running: bool = False) -> bool:
        """Report the job's new progress; True when it is over (or, ``until_running``, once
        the VM runs). A failed job raises its error."""
        from ..client.http import error_from
        target = job.get("target")
        for p in job.get("progress") or []:
            key = (p.get("t"), p.get("phase"), p.get("message"))
            if key in seen:
                continue
            seen.add(key)
            progress(Event(str(target) if target else None, str(p.get("phase", "")),
                           str(p.get("message", "")), float(p.get("t") or time.time()),
                           dict(p.get("data") or {})))
            if until_running and p.get("phase") == "state" and p.get("message") == "running":
                return True
        if job.get("state") == "failed":
            err = job.get("error") or {}
            if "message" not in err:
                err = {"error": "DaemonError", "message": f"job {job.get('id')} failed"}
            exc = error_from(0, err)
            exc.hint = _cli_hint(exc.hint)
            raise exc
        return job.get("state") != "running"

    async def _follow_job(self, c: AsyncClient, job: str, progress: Progress, *,
                          deadline: float | None = None, what: str = "",
                          seen: set[tuple[Any, ...]] | None = None) -> dict[str, Any]:
        seen = set() if seen is None else seen
        while True:
            with self.mapped():
                snapshot = await c.job(job)
            if self._job_step(snapshot, seen, progress):
                return snapshot
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"VM {what} was not ready in time (the daemon's job {job} "
                                  "is still waiting)", hint=f"`vmforge wait {what}`")
            await asyncio.sleep(_JOB_POLL)

    async def stop(self, name: str, timeout: float = 30.0) -> StopOutcome:
        async with self._aclient() as c:
            with self.mapped():
                d = await c.stop(_name(name), timeout=timeout)
        return StopOutcome(d["outcome"])

    def kill(self, name: str) -> StopOutcome:
        with self.mapped():
            d = self.client.kill(_name(name))
        return StopOutcome(d["outcome"])

    async def delete(self, name: str, *, force: bool = False,
                     stop_timeout: float = 10.0) -> None:
        async with self._aclient() as c:
            with self.mapped():
                await c.delete(_name(name), force=force, stop_timeout=stop_timeout)

    @asynccontextmanager
    async def agent(self, name: str, *, on_queued: Callable[[str], None] | None = None
                    ) -> AsyncIterator[RemoteAgent]:
        """The guest through the daemon (which queues sessions itself: ``on_queued`` is not
        called)."""
        async with self._aclient() as c:
            yield RemoteAgent(self, c, _name(name))

    # -- the console
    def console_file(self, name: str) -> Path:
        """The VM's console log, fetched into a local file (removed at exit); for
        `vmforge console -F`, a thread goes on appending what the daemon streams."""
        if name in self._consoles:
            return self._consoles[name]
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="vmforge-console-"))
            atexit.register(shutil.rmtree, self._tmp, True)
        path = self._tmp / f"{name}.log"
        with self.mapped():
            data = b"".join(self.client.console(_name(name)))
        path.write_bytes(data)
        self._consoles[name] = path
        if self.command == "console" and self.params.get("follow"):
            threading.Thread(target=self._follow_console, args=(name, path, len(data)),
                             daemon=True, name=f"console-{name}").start()
        return path

    def _follow_console(self, name: str, path: Path, skip: int) -> None:
        client = self._new_client()
        try:
            with open(path, "ab") as f:
                for chunk in client.console(name, follow=True):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if chunk:
                        f.write(chunk)
                        f.flush()
        except Exception:  # noqa: BLE001 - the daemon went away: the file just stops growing
            return
        finally:
            client.close()


# --------------------------------------------------------------------------- snapshots, pools

class RemoteSnapshots:
    """`vmforge snapshot / clone / run --from-snapshot / pool` through the daemon's
    ``/v1/snapshots``, ``/v1/vms/{name}/clone`` and ``/v1/pools``: the same dicts and records
    as :class:`vmforge.cli.snapshots.LocalOps`, so the commands print the same. The long
    operations run as the daemon's jobs, whose progress is shown as it comes; what the local
    commands check before any work (names, references) is checked here first, so the errors
    and exit codes are the same too."""

    def __init__(self, manager: RemoteManager) -> None:
        self.m = manager

    def _long(self, call: Callable[[AsyncClient], Any], progress: Progress) -> dict[str, Any]:
        """Start a job (``call`` with ``wait=False``), show its progress, return its result."""
        async def go() -> dict[str, Any]:
            async with self.m._aclient() as c:
                with self.m.mapped():
                    job = await call(c)
                done = await self.m._follow_job(c, str(job["id"]), progress)
                return dict(done.get("result") or {})
        result: dict[str, Any] = asyncio.run(go())
        return result

    @staticmethod
    def _timeout(t: float) -> float:
        return min(max(float(t), 1.0), 3600.0)

    def _record(self, d: dict[str, Any], *extra: str) -> VmRecord:
        return record_from({k: v for k, v in d.items() if k not in extra}, source=self.m)

    # -- snapshots
    def snapshot_create(self, vm: str, name: str | None, stop: bool,
                        progress: Progress) -> dict[str, Any]:
        from ..images.library import check_name
        if name is not None:
            check_name(name)
        return self._long(lambda c: c.snapshot(_name(vm), name, stop=stop, wait=False),
                          progress)

    def snapshots(self) -> list[dict[str, Any]]:
        with self.m.mapped():
            return self.m.client.snapshots()

    def snapshot(self, ref: str, show_secrets: bool) -> dict[str, Any]:
        from ..images.library import parse_ref
        parse_ref(ref)
        with self.m.mapped():
            return self.m.client.snapshot_info(ref, show_secrets=show_secrets)

    def remove_snapshot(self, ref: str) -> str:
        from ..images.library import parse_ref
        parse_ref(ref)
        with self.m.mapped():
            return str(self.m.client.remove_snapshot(ref)["ref"])

    # -- restores, clones
    def restore(self, ref: str, name: str, timeout: float, progress: Progress) -> VmRecord:
        from ..images.library import parse_ref
        from ..spec import validate_name
        parse_ref(ref)
        validate_name(name)
        d = self._long(lambda c: c.restore(ref, name, timeout=self._timeout(timeout),
                                           wait=False), progress)
        return self._record(d)

    def clone(self, vm: str, names: list[str], snapshot_name: str | None,
              timeout: float) -> tuple[list[VmRecord], str]:
        """The first clone through ``POST /v1/vms/{vm}/clone`` (one snapshot, taken once),
        any further ones restored from that snapshot."""
        from ..images.library import check_name
        from ..spec import validate_name
        from .common import progress
        for n in names:
            validate_name(n)
        if snapshot_name is not None:
            check_name(snapshot_name)
        with progress(names[0]) as p:
            d = self._long(lambda c: c.clone(_name(vm), names[0], snapshot_name=snapshot_name,
                                             timeout=self._timeout(timeout), wait=False), p)
        ref = str(d["snapshot"])
        recs = [self._record(d, "snapshot")]
        for n in names[1:]:
            with progress(n) as p:
                recs.append(self.restore(ref, n, timeout, p))
        return recs, ref

    # -- pools
    def create_pool(self, name: str, size: int, spec: Path | None,
                    from_snapshot: str | None, progress: Progress) -> dict[str, Any]:
        """A spec file is read here (as locally); its paths name files on the node."""
        from ..node.pools import check_pool_request
        check_pool_request(name, size, spec is not None, from_snapshot is not None)
        body_spec = None
        if spec is not None:
            from ..spec import load_request
            req = load_request(spec, None)
            body_spec = RemoteManager._body(req, spec.resolve().parent).get("spec") or {}
        return self._long(lambda c: c.create_pool(name, size, spec=body_spec,
                                                  from_snapshot=from_snapshot, wait=False),
                          progress)

    def pools(self) -> list[dict[str, Any]]:
        with self.m.mapped():
            return self.m.client.pools()

    def take(self, pool: str, name: str | None, timeout: float) -> VmRecord:
        from ..spec import NAME_RE, validate_name
        with self.m.mapped():
            if name is not None and not NAME_RE.fullmatch(name):
                self.m.client.pool(pool)  # an unknown pool is reported first, as locally
                validate_name(name)
            d = self.m.client.take(pool, name, timeout=self._timeout(timeout))
        return self._record(d, "take_seconds")

    def remove_pool(self, name: str) -> dict[str, Any]:
        with self.m.mapped():
            return self.m.client.remove_pool(name)
