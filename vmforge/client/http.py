"""The client's transport and methods (httpx): ``unix:///path`` or ``http(s)://host:port``
with a bearer token. ``VMFORGE_HOST``, ``VMFORGE_TOKEN`` and ``VMFORGE_TOKEN_FILE`` give the
defaults."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .. import errors as errmod
from ..errors import VmforgeError
from .snapshots import AsyncSnapshotCalls, SnapshotCalls

__all__ = ["Client", "AsyncClient", "ClientExecResult", "DaemonError", "resolve_host",
           "error_from"]

OutputFn = Callable[[str, bytes], None]
AsyncOutputFn = Callable[[str, bytes], Awaitable[None] | None]


class DaemonError(VmforgeError):
    """An error the daemon reported whose kind has no class here (or a transport error)."""

    def __init__(self, message: str, *, status: int | None = None, kind: str = "",
                 field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.kind = kind
        self.field = field


@dataclass
class ClientExecResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration: float
    stdout: bytes = b""
    stderr: bytes = b""
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def error_from(status: int, body: Any) -> VmforgeError:
    """The daemon's JSON error as the vmforge exception it came from."""
    if not isinstance(body, dict) or "message" not in body:
        return DaemonError(f"HTTP {status}: {str(body)[:500]}", status=status)
    kind = str(body.get("error", ""))
    message = str(body["message"])
    hint, fld = body.get("hint"), body.get("field")
    cls = getattr(errmod, kind, None)
    exc: VmforgeError
    if isinstance(cls, type) and issubclass(cls, errmod.SpecError):
        exc = cls(message, hint=hint)
        exc.message = message  # the daemon's message already names the field
        exc.field = fld
    elif cls is errmod.LaunchError:
        exc = errmod.LaunchError(message, hint=hint)
    elif isinstance(cls, type) and issubclass(cls, VmforgeError) and cls not in (
            errmod.CommandError, errmod.ProvisionError, errmod.RemoteError):
        exc = cls(message, hint=hint)
    else:
        exc = DaemonError(message, status=status, kind=kind, field=fld, hint=hint)
    exc.status = status  # type: ignore[attr-defined]
    return exc


def resolve_host(host: str | None = None) -> str:
    """``host``, else ``$VMFORGE_HOST``, else the default data directory's unix socket."""
    host = host or os.environ.get("VMFORGE_HOST")
    if host:
        return host
    from ..paths import default_data_dir
    return f"unix://{default_data_dir() / 'vmforge.sock'}"


def _token(token: str | None, token_file: str | Path | None) -> str | None:
    if token:
        return token
    if os.environ.get("VMFORGE_TOKEN"):
        return os.environ["VMFORGE_TOKEN"]
    path = token_file or os.environ.get("VMFORGE_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise DaemonError(f"cannot read the token file {path}: {exc.strerror}") from None
    return None


def _endpoint(host: str) -> tuple[str, str | None]:
    """(base URL, unix socket path or None)."""
    if host.startswith("unix://"):
        return "http://vmforge", host[len("unix://"):]
    if host.startswith("/"):
        return "http://vmforge", host
    if host.startswith(("http://", "https://")):
        return host.rstrip("/"), None
    raise DaemonError(f"unsupported daemon address {host!r}",
                      hint="use unix:///path/to/vmforge.sock or https://node:PORT")


def _exec_body(argv: list[str], shell: bool, env: Mapping[str, str] | None, cwd: str | None,
               stdin: bytes | str | None, timeout: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"argv": list(argv), "shell": shell}
    if env:
        body["env"] = dict(env)
    if cwd:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout"] = timeout
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    return body


def _final(line: dict[str, Any], out: list[bytes], err: list[bytes]) -> ClientExecResult:
    return ClientExecResult(line.get("exit_code"), line.get("signal"),
                            bool(line.get("timed_out")), float(line.get("duration") or 0),
                            b"".join(out), b"".join(err), line.get("error"))


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    data: list[str] = []
    eid = None
    for line in lines:
        if line == "":
            if data:
                ev = json.loads("\n".join(data))
                if eid is not None:
                    ev.setdefault("id", int(eid) if eid.isdigit() else eid)
                yield ev
            data, eid = [], None
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("id:"):
            eid = line[3:].strip()


def _check(r: httpx.Response) -> None:
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        raise error_from(r.status_code, body)


@dataclass
class _Base:
    host: str | None = None
    token: str | None = None
    token_file: str | Path | None = None
    verify: bool | str = True
    timeout: float = 60.0
    base_url: str = field(init=False, default="")
    uds: str | None = field(init=False, default=None)
    headers: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.host = resolve_host(self.host)
        self.base_url, self.uds = _endpoint(self.host)
        tok = _token(self.token, self.token_file)
        if tok:
            self.headers["Authorization"] = f"Bearer {tok}"

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}({self.host!r})"


class Client(_Base, SnapshotCalls):
    """Synchronous client; one kept-alive connection pool."""

    def __post_init__(self) -> None:
        super().__post_init__()
        transport = httpx.HTTPTransport(uds=self.uds, verify=self.verify) if self.uds \
            else httpx.HTTPTransport(verify=self.verify)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers,
                                 transport=transport, timeout=self.timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _req(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DaemonError(f"cannot reach the daemon at {self.host}: {exc}",
                              hint="is `vmforge serve` running?") from exc
        _check(r)
        return r.json()

    # -- VMs
    def vms(self) -> list[dict[str, Any]]:
        return list(self._req("GET", "/v1/vms"))

    def get(self, name: str, *, show_secrets: bool = False) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/vms/{name}",
                              params={"show_secrets": show_secrets}))

    def create(self, request: Mapping[str, Any], *, start: bool = True, wait: str = "none",
               timeout: float = 300, keep_on_failure: bool = False) -> dict[str, Any]:
        return dict(self._req("POST", "/v1/vms", json=dict(request),
                              params={"start": start, "wait": wait, "timeout": timeout,
                                      "keep_on_failure": keep_on_failure},
                              timeout=timeout + 60))

    def start(self, name: str, *, wait: str = "running", timeout: float = 300
              ) -> dict[str, Any]:
        return dict(self._req("POST", f"/v1/vms/{name}/start",
                              params={"wait": wait, "timeout": timeout}, timeout=timeout + 60))

    def stop(self, name: str, *, timeout: float = 30) -> dict[str, Any]:
        return dict(self._req("POST", f"/v1/vms/{name}/stop", params={"timeout": timeout},
                              timeout=timeout + 60))

    def kill(self, name: str) -> dict[str, Any]:
        return dict(self._req("POST", f"/v1/vms/{name}/kill"))

    def delete(self, name: str, *, force: bool = False, stop_timeout: float = 10
               ) -> dict[str, Any]:
        return dict(self._req("DELETE", f"/v1/vms/{name}",
                              params={"force": force, "stop_timeout": stop_timeout},
                              timeout=stop_timeout + 60))

    def console(self, name: str, *, follow: bool = False, tail: int = 0) -> Iterator[bytes]:
        with self.http.stream("GET", f"/v1/vms/{name}/console",
                              params={"follow": follow, "tail": tail}, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            yield from r.iter_bytes()

    # -- guest
    def exec_lines(self, name: str, argv: list[str], *, shell: bool = False,
                   env: Mapping[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes | str | None = None, timeout: float | None = None
                   ) -> Iterator[dict[str, Any]]:
        """The NDJSON lines as they come (output lines, then the final one)."""
        body = _exec_body(argv, shell, env, cwd, stdin, timeout)
        with self.http.stream("POST", f"/v1/vms/{name}/exec", json=body, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)

    def exec(self, name: str, argv: list[str], *, shell: bool = False,
             env: Mapping[str, str] | None = None, cwd: str | None = None,
             stdin: bytes | str | None = None, timeout: float | None = None,
             on_output: OutputFn | None = None) -> ClientExecResult:
        out: list[bytes] = []
        err: list[bytes] = []
        for line in self.exec_lines(name, argv, shell=shell, env=env, cwd=cwd, stdin=stdin,
                                    timeout=timeout):
            if "stream" in line:
                data = base64.b64decode(line["data"])
                (out if line["stream"] == "stdout" else err).append(data)
                if on_output is not None:
                    on_output(line["stream"], data)
            else:
                return _final(line, out, err)
        raise DaemonError("the exec stream ended without an exit code",
                          hint="the daemon or the VM may have stopped")

    def put_file(self, name: str, local: str | Path, remote: str, *,
                 mode: int | None = None) -> dict[str, Any]:
        local = Path(local)
        digest = _sha256(local)
        params: dict[str, Any] = {"path": remote}
        params["mode"] = f"{(mode if mode is not None else local.stat().st_mode) & 0o7777:04o}"

        def chunks() -> Iterator[bytes]:
            with open(local, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
        return dict(self._req("PUT", f"/v1/vms/{name}/files", params=params, content=chunks(),
                              headers={"X-Content-SHA256": digest,
                                       "Content-Type": "application/octet-stream"},
                              timeout=None))

    def get_file(self, name: str, remote: str, local: str | Path) -> dict[str, Any]:
        local = Path(local)
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
        h = hashlib.sha256()
        size = 0
        try:
            with self.http.stream("GET", f"/v1/vms/{name}/files", params={"path": remote},
                                  timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                want = r.headers.get("x-content-sha256", "")
                mode = _mode(r.headers.get("x-file-mode"))
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            if want and h.hexdigest() != want:
                raise errmod.ChecksumError(f"checksum mismatch downloading {remote}: got "
                                           f"{h.hexdigest()}, the daemon says {want}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return {"path": remote, "size": size, "sha256": h.hexdigest(), "mode": mode}

    def health(self, name: str) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/vms/{name}/health", timeout=120))

    # -- images and jobs
    def images(self) -> list[dict[str, Any]]:
        return list(self._req("GET", "/v1/images"))

    def image(self, ref: str) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/images/{ref}"))

    def remove_image(self, ref: str) -> dict[str, Any]:
        return dict(self._req("DELETE", f"/v1/images/{ref}"))

    def prune(self) -> list[str]:
        return list(self._req("POST", "/v1/images/prune")["removed"])

    def pull(self, url: str, name: str, *, sha256: str | None = None,
             sha256sums_url: str | None = None) -> dict[str, Any]:
        body = {"url": url, "name": name, "sha256": sha256, "sha256sums_url": sha256sums_url}
        return dict(self._req("POST", "/v1/images/pull",
                              json={k: v for k, v in body.items() if v is not None}))

    def import_image(self, path: str, name: str) -> dict[str, Any]:
        return dict(self._req("POST", "/v1/images/import", json={"path": path, "name": name}))

    def build(self, kind: str, **fields: Any) -> dict[str, Any]:
        return dict(self._req("POST", "/v1/images/build", json={"kind": kind, **fields}))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._req("GET", "/v1/jobs"))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/jobs/{job_id}"))

    def wait_job(self, job_id: str, timeout: float = 3600, poll: float = 0.5
                 ) -> dict[str, Any]:
        """Until the job has finished; raises its error if it failed."""
        import time
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] != "running":
                if job["state"] == "failed":
                    raise error_from(0, job.get("error") or {})
                return job
            if time.monotonic() > deadline:
                raise DaemonError(f"job {job_id} still running after {timeout:.0f}s")
            time.sleep(poll)

    # -- events, host
    def events(self, *, vm: str | None = None, last_event_id: int | None = None,
               replay: bool = False, follow: bool = True, limit: float | None = None
               ) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] = {"replay": replay, "follow": follow}
        if vm:
            params["vm"] = vm
        if limit:
            params["limit"] = limit
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        with self.http.stream("GET", "/v1/events", params=params, headers=headers,
                              timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            yield from _sse(r.iter_lines())

    def host_info(self) -> dict[str, Any]:
        return dict(self._req("GET", "/v1/host", timeout=120))


class AsyncClient(_Base, AsyncSnapshotCalls):
    """Asynchronous client (the same methods, as coroutines and async iterators)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        transport = httpx.AsyncHTTPTransport(uds=self.uds, verify=self.verify) if self.uds \
            else httpx.AsyncHTTPTransport(verify=self.verify)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                      transport=transport, timeout=self.timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _req(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DaemonError(f"cannot reach the daemon at {self.host}: {exc}",
                              hint="is `vmforge serve` running?") from exc
        _check(r)
        return r.json()

    async def vms(self, *, show_secrets: bool = False) -> list[dict[str, Any]]:
        return list(await self._req("GET", "/v1/vms", params={"show_secrets": show_secrets}))

    async def get(self, name: str, *, show_secrets: bool = False) -> dict[str, Any]:
        return dict(await self._req("GET", f"/v1/vms/{name}",
                                    params={"show_secrets": show_secrets}))

    async def create(self, request: Mapping[str, Any], *, start: bool = True,
                     wait: str = "none", timeout: float = 300,
                     keep_on_failure: bool = False) -> dict[str, Any]:
        return dict(await self._req("POST", "/v1/vms", json=dict(request),
                                    params={"start": start, "wait": wait, "timeout": timeout,
                                            "keep_on_failure": keep_on_failure},
                                    timeout=timeout + 60))

    async def start(self, name: str, *, wait: str = "running", timeout: float = 300
                    ) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/vms/{name}/start",
                                    params={"wait": wait, "timeout": timeout},
                                    timeout=timeout + 60))

    async def stop(self, name: str, *, timeout: float = 30) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/vms/{name}/stop",
                                    params={"timeout": timeout}, timeout=timeout + 60))

    async def kill(self, name: str) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/vms/{name}/kill"))

    async def delete(self, name: str, *, force: bool = False, stop_timeout: float = 10
                     ) -> dict[str, Any]:
        return dict(await self._req("DELETE", f"/v1/vms/{name}",
                                    params={"force": force, "stop_timeout": stop_timeout},
                                    timeout=stop_timeout + 60))

    async def exec(self, name: str, argv: list[str], *, shell: bool = False,
                   env: Mapping[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes | str | None = None, timeout: float | None = None,
                   on_output: AsyncOutputFn | None = None) -> ClientExecResult:
        body = _exec_body(argv, shell, env, cwd, stdin, timeout)
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            async with self.http.stream("POST", f"/v1/vms/{name}/exec", json=body,
                                        timeout=None) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r)
                async for raw in r.aiter_lines():
                    if not raw:
                        continue
                    line = json.loads(raw)
                    if "stream" in line:
                        data = base64.b64decode(line["data"])
                        (out if line["stream"] == "stdout" else err).append(data)
                        if on_output is not None:
                            res = on_output(line["stream"], data)
                            if res is not None:
                                await res
                    else:
                        return _final(line, out, err)
        except httpx.TransportError as exc:
            raise DaemonError(f"lost the daemon at {self.host} during exec: {exc}",
                              hint="is `vmforge serve` running?") from exc
        raise DaemonError("the exec stream ended without an exit code",
                          hint="the daemon or the VM may have stopped")

    async def put_file(self, name: str, local: str | Path, remote: str, *,
                       mode: int | None = None) -> dict[str, Any]:
        """Upload ``local`` to ``remote`` in the guest (streamed; sha256 checked by the daemon
        and again in the guest). ``mode`` defaults to the local file's."""
        local = Path(local)
        digest = _sha256(local)
        mode = (mode if mode is not None else local.stat().st_mode) & 0o7777

        async def chunks() -> AsyncIterator[bytes]:
            with open(local, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
        return dict(await self._req("PUT", f"/v1/vms/{name}/files",
                                    params={"path": remote, "mode": f"{mode:04o}"},
                                    content=chunks(), timeout=None,
                                    headers={"X-Content-SHA256": digest,
                                             "Content-Type": "application/octet-stream"}))

    async def get_file(self, name: str, remote: str, local: str | Path) -> dict[str, Any]:
        """Download ``remote`` to ``local`` (written whole or not at all, sha256 checked);
        the result carries the guest file's ``mode``."""
        local = Path(local)
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
        h = hashlib.sha256()
        size = 0
        try:
            async with self.http.stream("GET", f"/v1/vms/{name}/files",
                                        params={"path": remote}, timeout=None) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r)
                want = r.headers.get("x-content-sha256", "")
                mode = _mode(r.headers.get("x-file-mode"))
                with open(tmp, "wb") as f:
                    async for chunk in r.aiter_bytes(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            if want and h.hexdigest() != want:
                raise errmod.ChecksumError(f"checksum mismatch downloading {remote}: got "
                                           f"{h.hexdigest()}, the daemon says {want}")
            os.replace(tmp, local)
        except httpx.TransportError as exc:
            raise DaemonError(f"cannot reach the daemon at {self.host}: {exc}",
                              hint="is `vmforge serve` running?") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return {"path": remote, "size": size, "sha256": h.hexdigest(), "mode": mode}

    async def health(self, name: str, *, timeout: float = 60) -> dict[str, Any]:
        return dict(await self._req("GET", f"/v1/vms/{name}/health",
                                    params={"timeout": timeout}, timeout=timeout + 60))

    async def job(self, job_id: str) -> dict[str, Any]:
        return dict(await self._req("GET", f"/v1/jobs/{job_id}"))

    async def wait_job(self, job_id: str, timeout: float = 3600, poll: float = 0.5
                       ) -> dict[str, Any]:
        """Until the job has finished; raises its error if it failed."""
        import asyncio
        import time
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["state"] != "running":
                if job["state"] == "failed":
                    raise error_from(0, job.get("error") or {})
                return job
            if time.monotonic() > deadline:
                raise DaemonError(f"job {job_id} still running after {timeout:.0f}s")
            await asyncio.sleep(poll)

    async def events(self, *, vm: str | None = None, last_event_id: int | None = None,
                     replay: bool = False, follow: bool = True, limit: float | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        params: dict[str, Any] = {"replay": replay, "follow": follow}
        if vm:
            params["vm"] = vm
        if limit:
            params["limit"] = limit
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        async with self.http.stream("GET", "/v1/events", params=params, headers=headers,
                                    timeout=None) as r:
            if r.status_code >= 400:
                await r.aread()
                _check(r)
            lines: list[str] = []
            async for line in r.aiter_lines():
                lines.append(line)
                if line == "":
                    for ev in _sse(iter(lines)):
                        yield ev
                    lines = []

    async def host_info(self) -> dict[str, Any]:
        return dict(await self._req("GET", "/v1/host", timeout=120))


def _mode(header: str | None) -> int | None:
    """``X-File-Mode`` (``0o644``) as a number; None when absent or malformed."""
    try:
        return int(header, 8) if header else None
    except ValueError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
