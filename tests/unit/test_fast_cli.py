"""The fast entry path: what it takes, what it hands to typer, and that it needs no framework."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmforge.cli import fast


def test_exec_arguments() -> None:
    opts = fast._parse_exec(["-e", "A=1", "--env=B=2", "-w", "/tmp", "--timeout=5", "--shell",
                             "vm", "--", "ls", "-l"])
    assert opts == {"env": ["A=1", "B=2"], "cwd": "/tmp", "timeout": 5.0, "shell": True,
                    "name": "vm", "command": ["--", "ls", "-l"]}
    assert fast._parse_exec(["-it", "vm", "top"])["tty"] is True


@pytest.mark.parametrize("argv", [["exec", "--help"], ["exec", "--bogus", "vm", "true"],
                                  ["exec", "-e"], ["exec", "--timeout", "soon", "vm", "x"],
                                  ["ls", "--long"], ["seed", "build", "out.iso"],
                                  ["seed", "validate", "x"], ["run", "-f", "x"], []])
def test_anything_else_goes_to_typer(argv: list[str]) -> None:
    assert fast.dispatch(argv) is None


def test_seed_build_arguments() -> None:
    opts = fast._parse_seed_build(["out.iso", "--user-data", "ud", "--meta-data=md",
                                   "--format", "vfat", "--no-schema-check"])
    assert opts == {"output": "out.iso", "user_data": "ud", "meta_data": "md",
                    "fmt": "vfat", "schema": False}


def test_errors_are_reported_plainly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = fast.dispatch(["seed", "build", str(tmp_path / "s.iso"), "--user-data",
                          str(tmp_path / "missing.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --user-data: cannot read") and "Traceback" not in err
    assert not (tmp_path / "s.iso").exists()


# ---------------------------------------------------------------------------- exec's quick path

def test_the_quick_readers_agree_with_the_manager(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from vmforge.locations import data_root
    from vmforge.paths import default_data_dir
    from vmforge.state import SCHEMA_VERSION
    assert fast._STATE_SCHEMA == SCHEMA_VERSION
    for env in ({"VMFORGE_HOME": str(tmp_path / "h")}, {"XDG_DATA_HOME": str(tmp_path / "x")},
                {"HOME": str(tmp_path / "home")}):
        for k in ("VMFORGE_HOME", "XDG_DATA_HOME"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert data_root() == str(default_data_dir())


def _row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, state: str = "running",
         runtime: object = None, agent: bool = True) -> None:
    import json

    from vmforge.state import Database
    monkeypatch.setenv("VMFORGE_HOME", str(tmp_path))
    db = Database(tmp_path / "state.db")
    rt = runtime if runtime is not None else {
        "accel": "tcg", "backend": "qemu", "pid": 1,
        "agent": {"kind": "unix", "path": str(tmp_path / "agent.sock")}}
    with db.tx() as c:
        cols = {r[1]: r for r in c.execute("PRAGMA table_info(vms)").fetchall()}
        values = {"name": "vm", "state": state, "dir": str(tmp_path / "vm"),
                  "backend": "qemu", "created_at": 1.0, "runtime": json.dumps(rt),
                  "spec": json.dumps({"name": "vm", "spec": {"agent": {"enabled": agent}}})}
        for col, info in cols.items():  # any other NOT NULL column gets a plain value
            if info[3] and info[4] is None and col not in values:
                values[col] = 0
        c.execute(f"INSERT INTO vms ({', '.join(values)}) VALUES "
                  f"({', '.join('?' * len(values))})", tuple(values.values()))
    db.close()


def test_quick_endpoint_of_a_running_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _row(tmp_path, monkeypatch)
    assert fast.quick_agent_endpoint("vm") == str(tmp_path / "agent.sock")
    assert fast.quick_agent_endpoint("other") is None


@pytest.mark.parametrize("kw", [{"state": "stopped"}, {"state": "starting"}, {"agent": False},
                                {"runtime": {"backend": "qemu"}},
                                {"runtime": {"agent": {"kind": "vsock", "cid": "x"}}}])
def test_anything_unusual_goes_the_managers_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                kw: dict[str, object]) -> None:
    _row(tmp_path, monkeypatch, **kw)  # type: ignore[arg-type]
    assert fast.quick_agent_endpoint("vm") is None


def test_quick_endpoint_for_vsock_and_hybrid(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _row(tmp_path, monkeypatch, runtime={"agent": {"kind": "hybrid-vsock", "path": "/r/v.sock",
                                                   "port": 1024}})
    assert fast.quick_agent_endpoint("vm") == "hvsock:/r/v.sock:1024"
    # what a driver records is what is read back (the stored form is AgentEndpoint's)
    from vmforge.hypervisors.base import AgentEndpoint, EndpointKind
    for ep in (AgentEndpoint(EndpointKind.HYBRID_VSOCK, path="/r/v.sock", port=1024),
               AgentEndpoint(EndpointKind.VSOCK, cid=7, port=1024),
               AgentEndpoint(EndpointKind.UNIX, path="/r/agent.sock")):
        _row(tmp_path / ep.kind.value, monkeypatch, runtime={"agent": ep.to_json()})
        assert fast.quick_agent_endpoint("vm") == str(ep)


def test_no_database_no_quick_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORGE_HOME", str(tmp_path / "none"))
    assert fast.quick_agent_endpoint("vm") is None
    assert not (tmp_path / "none").exists()  # a read never creates the data directory


def test_a_refused_quick_connection_falls_back_to_the_manager(tmp_path: Path) -> None:
    """A VM whose process died leaves its socket path behind: the quick path is refused and
    the manager (which reconciles and explains) is asked instead."""
    import socket

    from vmforge.errors import VmNotFound
    sock = tmp_path / "agent.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # bound, never listening: connections are refused
    asked = []

    class Manager:
        def agent(self, name: str, **kw: object) -> object:
            asked.append(name)
            raise VmNotFound(f"no VM named {name!r}")

    with pytest.raises(VmNotFound):
        fast.exec_command(lambda: Manager(), "vm", ["true"],  # type: ignore[arg-type,return-value]
                          endpoint=str(sock))
    assert asked == ["vm"]
