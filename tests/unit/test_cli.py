"""The CLI in-process: bad input gives a clear error, a script-friendly exit code, and leaves
nothing behind (no VM directory, no state row). No process is started here."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmforge.cli.main import app

BAD = {
    "bad-yaml.yaml": ("name: a\nspec:\n  memory_mib: [1\n", "line 4, column 1"),
    "unknown.yaml": ("name: a\nspec:\n  cpu_cores: 1\n  gpus: 2\n", "spec.gpus: unknown field"),
    "negative.yaml": ("name: a\nspec:\n  memory_mib: -512\n", "spec.memory_mib"),
    "escape.yaml": ("name: ../../etc\n", "name: must be 1-63 letters"),
    "backing.yaml": ("name: a\nspec:\n  disks: [{id: d, bootable: true, "
                     "backing_file: missing.qcow2}]\n", "spec.disks[0].backing_file"),
}


@pytest.mark.parametrize("fname", sorted(BAD))
def test_bad_input_is_clear_and_leaves_nothing(fname: str, tmp_path: Path) -> None:
    text, words = BAD[fname]
    spec = tmp_path / fname
    spec.write_text(text)
    data = tmp_path / "data"
    res = CliRunner().invoke(app, ["--data-dir", str(data), "create", "-f", str(spec)])
    assert res.exit_code == 2, res.output
    assert words in " ".join(res.output.split())
    vms = data / "vms"
    assert not vms.exists() or list(vms.iterdir()) == []
    if (data / "state.db").exists():
        rows = sqlite3.connect(data / "state.db").execute("SELECT COUNT(*) FROM vms")
        assert rows.fetchone()[0] == 0


def test_unknown_vm_exit_code_and_json_ls(tmp_path: Path) -> None:
    runner = CliRunner()
    d = ["--data-dir", str(tmp_path)]
    res = runner.invoke(app, [*d, "inspect", "ghost"])
    assert res.exit_code == 4 and "no VM named 'ghost'" in res.output
    res = runner.invoke(app, [*d, "ls", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []


def test_help_lists_the_commands() -> None:
    res = CliRunner().invoke(app, ["--help"])
    for cmd in ("create", "run", "start", "stop", "kill", "rm", "ls", "inspect", "console",
                "exec", "cp", "wait", "health", "doctor", "seed", "image"):
        assert cmd in res.output
