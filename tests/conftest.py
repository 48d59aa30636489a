"""Test plumbing.

* Unit tests may not start processes: an autouse fixture installs a guard on vmforge.run that
  raises unless the test is marked ``subprocess`` or ``vm`` (as cloud-init's tests do).
* Every test gets its own VMFORGE_HOME; the build cache (~/.cache/vmforge) is shared so the
  minimal image is built once per machine, keyed by its recipe.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from vmforge import run


class ProcessesForbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    allowed = request.node.get_closest_marker("subprocess") or \
        request.node.get_closest_marker("vm")
    if not allowed:
        def guard(argv: Sequence[str]) -> None:
            raise ProcessesForbidden(f"unit test tried to run {list(argv)!r}; mark it "
                                     "@pytest.mark.subprocess if it really must")
        run.set_guard(guard)
    yield
    run.set_guard(None)


@pytest.fixture(autouse=True)
def _data_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
               ) -> None:
    monkeypatch.setenv("VMFORGE_HOME", str(tmp_path_factory.mktemp("home")))
