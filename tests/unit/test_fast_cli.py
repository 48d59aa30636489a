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
