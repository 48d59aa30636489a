"""`vmforge` against a real `vmforge serve` (``VMFORGE_HOST`` / ``--host``), as `docker -H`:
on the daemon's unix socket and on 127.0.0.1 with its token, `run` boots a VM to ready,
`ls`/`inspect --json` print what the same commands print on the node's data directory, `exec`
streams and carries the exit code, `cp` moves a directory both ways with its modes, `stop`,
`start`, `rm -f` work; a wrong or missing token and the local-only commands fail clearly, with
their exit codes and no traceback. One VM; the daemon is stopped by its pid."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import free_port
from vmforge.client import Client
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "minimal.yaml"


class Daemon:
    def __init__(self, data: DataDir, tmp: Path) -> None:
        self.data = data
        self.tmp = tmp
        self.port = free_port()
        self.socket = tmp / "d.sock"
        self.token_file = tmp / "token"
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def unix(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def start(self) -> None:
        env = {**os.environ, "VMFORGE_HOME": str(self.data.root)}
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmforge", "serve", "--socket", str(self.socket),
                 "--listen", f"127.0.0.1:{self.port}", "--token-file", str(self.token_file)],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(self.unix, timeout=10) as c:
                    c.vms()
                return
            except Exception:  # noqa: BLE001 - not up yet
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def daemon(vm_data: DataDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(vm_data, tmp_path_factory.mktemp("remote-cli"))
    d.start()
    try:
        yield d
    finally:
        try:
            _remove("r1", d)
        finally:
            d.stop()
            assert d.token not in d.log.read_text(errors="replace")


def _remove(name: str, d: Daemon) -> None:
    """Through the daemon if it answers, else on the data directory itself."""
    try:
        with Client(d.unix, timeout=120) as c:
            c.delete(name, force=True, stop_timeout=0)
        return
    except Exception:  # noqa: BLE001 - gone already, or no daemon
        pass
    m = VmManager(d.data)
    try:
        asyncio.run(m.delete(name, force=True, stop_timeout=0))
    except Exception:  # noqa: BLE001 - gone already
        pass
    finally:
        m.close()


def vmforge(*args: str, host: str | None = None, local: DataDir | None = None,
            input: bytes | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The CLI as a user runs it: against ``host`` (VMFORGE_HOST), or on ``local``."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("VMFORGE_HOST", "VMFORGE_TOKEN", "VMFORGE_TOKEN_FILE", "VMFORGE_HOME")}
    e["NO_COLOR"] = "1"
    if host:
        e["VMFORGE_HOST"] = host
        e["VMFORGE_HOME"] = "/nonexistent/not-used-remotely"
    if local is not None:
        e["VMFORGE_HOME"] = str(local.root)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "vmforge", *args], cwd=ROOT, env=e,
                          input=input, capture_output=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def ok(res: subprocess.CompletedProcess[bytes], code: int = 0) -> str:
    out = res.stdout.decode(errors="replace")
    err = res.stderr.decode(errors="replace")
    assert res.returncode == code, f"exit {res.returncode}\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out


def test_the_cli_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    unix = daemon.unix
    tcp = daemon.tcp
    token = {"VMFORGE_TOKEN_FILE": str(daemon.token_file)}

    out = ok(vmforge("run", "-f", str(SPEC), "--name", "r1", host=unix))
    assert out.startswith("r1 is ready in ") and "(agent ready) · qemu" in out, out

    # the same JSON as the same commands on the node's data directory
    for argv in (["ls", "--json"], ["inspect", "r1", "--json"],
                 ["inspect", "r1", "--json", "--show-secrets"]):
        there = json.loads(ok(vmforge(*argv, host=unix)))
        here = json.loads(ok(vmforge(*argv, local=daemon.data)))
        assert there == here, argv
    rows = ok(vmforge("ls", host=tcp, env=token)).splitlines()
    assert rows[0].split()[:3] == ["NAME", "STATE", "BACKEND"]
    assert rows[1].split()[:3] == ["r1", "running", "qemu"]

    # exec: output, stderr, the exit code, stdin, env; over TCP with the token
    res = vmforge("exec", "r1", "--", "sh", "-c", "echo hi; echo oops >&2; exit 3",
                  host=tcp, env=token)
    assert ok(res, 3) == "hi\n" and res.stderr == b"oops\n"
    res = vmforge("exec", "r1", "--", "sh", "-c", "echo hi; exit 3", host=unix)
    assert ok(res, 3) == "hi\n"
    assert ok(vmforge("exec", "-i", "-e", "K=v", "r1", "--", "sh", "-c", "cat; echo $K",
                      input=b"from stdin\n", host=tcp, env=token)) == "from stdin\nv\n"
    res = vmforge("exec", "r1", "--", "/nonexistent", host=tcp, env=token)
    ok(res, 1)
    assert b"No such file or directory" in res.stderr
    assert ok(vmforge("--host", daemon.tcp, "--token-file", str(daemon.token_file), "exec",
                      "r1", "--", "uname", "-s")) == "Linux\n"  # typer's path

    # cp: a directory up and back down, contents and modes; a single file
    up = tmp_path / "up"
    (up / "sub" / "deep").mkdir(parents=True)
    (up / "a.txt").write_text("a\n")
    (up / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (up / "sub" / "deep" / "c").write_text("c\n")
    (up / "sub" / "deep" / "c").chmod(0o600)
    (up / "sub").chmod(0o750)
    res = vmforge("cp", str(up), "r1:/srv/up", host=tcp, env=token)
    ok(res)
    assert b"copied 3 file(s)" in res.stderr
    down = tmp_path / "down"
    ok(vmforge("cp", "r1:/srv/up", str(down), host=unix))
    for p in up.rglob("*"):
        q = down / p.relative_to(up)
        assert (p.stat().st_mode & 0o7777) == (q.stat().st_mode & 0o7777), p
        if p.is_file():
            assert p.read_bytes() == q.read_bytes(), p
    ok(vmforge("cp", "r1:/srv/up/a.txt", str(tmp_path / "a2.txt"), host=tcp, env=token))
    assert (tmp_path / "a2.txt").read_text() == "a\n"
    ok(vmforge("cp", "r1:/nonexistent", str(tmp_path / "x"), host=unix), 1)

    res = vmforge("exec", "-t", "r1", "--", "sh", host=unix)  # no terminal over the API
    ok(res, 2)
    assert b"terminal session" in res.stderr and b"--host" in res.stderr

    health = json.loads(ok(vmforge("health", "r1", "--json", host=unix)))
    assert health["healthy"] and health["agent"]
    assert "vmforge: ready" in ok(vmforge("console", "r1", host=unix))

    # lifecycle
    assert ok(vmforge("stop", "r1", host=unix)).startswith("stopped r1")
    res = vmforge("exec", "r1", "--", "true", host=unix)
    ok(res, 6)
    assert b"`vmforge start r1`" in res.stderr
    assert ok(vmforge("start", "r1", host=tcp, env=token)).startswith("r1 ready in ")
    assert ok(vmforge("exec", "r1", "--", "echo", "back", host=unix)) == "back\n"
    res = vmforge("rm", "r1", host=unix)
    ok(res, 6)
    assert b"rm -f r1" in res.stderr
    assert ok(vmforge("rm", "-f", "r1", host=unix)) == "removed r1\n"
    assert json.loads(ok(vmforge("ls", "--json", host=unix))) == []
    ok(vmforge("inspect", "r1", host=unix), 4)


def test_tokens_and_addresses(daemon: Daemon) -> None:
    res = vmforge("ls", host=daemon.tcp,
                  env={"VMFORGE_TOKEN": "wrong-token-1234567890"})
    ok(res, 77)
    assert b"wrong token" in res.stderr and b"wrong-token-1234567890" not in res.stderr
    res = vmforge("exec", "r1", "--", "true", host=daemon.tcp)
    ok(res, 77)
    assert b"needs a token" in res.stderr and b"VMFORGE_TOKEN" in res.stderr
    res = vmforge("--host", daemon.tcp, "inspect", "r1")  # typer's path
    ok(res, 77)
    ok(vmforge("ls", host=daemon.tcp, env={"VMFORGE_TOKEN": daemon.token}))
    res = vmforge("ls", host=f"unix://{daemon.tmp}/nothing.sock")
    ok(res, 69)
    assert b"cannot reach the daemon" in res.stderr
    assert daemon.token.encode() not in res.stdout + res.stderr


def test_local_only_commands(daemon: Daemon, tmp_path: Path) -> None:
    ud = tmp_path / "user-data"
    ud.write_text("#cloud-config\n")
    seed = tmp_path / "seed.iso"
    for argv in (["seed", "build", str(seed), "--user-data", str(ud)],  # the fast path
                 ["image", "build", "minimal"], ["shell", "r1"], ["plan", "-f", str(SPEC)],
                 ["timeline", "r1"], ["network", "ls"]):
        res = vmforge(*argv, host=daemon.unix)
        ok(res, 2)
        assert b"--host" in res.stderr, res.stderr
    assert not seed.exists()
