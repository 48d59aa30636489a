"""Fetch Debian packages with the host's apt configuration and unpack them without installing."""

from __future__ import annotations

import re
from pathlib import Path

from .. import run
from ..errors import BuildError

__all__ = ["resolve_dependency", "package_uris", "fetch_debs", "extract_deb"]

_APT_OPTS = ["-o", "APT::Sandbox::User=root", "-q"]


def resolve_dependency(meta: str, prefix: str) -> str:
    """The first hard dependency of ``meta`` that starts with ``prefix``."""
    out = run.run(["apt-cache", "depends", "--important", meta], what="apt-cache depends",
                  hint="run `apt-get update` first").text
    for line in out.splitlines():
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix):
            return m.group(1)
    raise BuildError(f"cannot resolve {meta}: no dependency starting with {prefix!r}",
                     hint="run `apt-get update`")


def package_uris(packages: list[str]) -> dict[str, str]:
    """Package name -> .deb file name apt would download (names carry versions)."""
    res = run.run(["apt-get", *_APT_OPTS, "download", "--print-uris", *packages],
                  what="apt-get download --print-uris", hint="run `apt-get update` first")
    out = {}
    for line in res.text.splitlines():
        m = re.match(r"'[^']+'\s+(\S+\.deb)\s", line)
        if m:
            out[m.group(1).split("_", 1)[0]] = m.group(1)
    missing = set(packages) - set(out)
    if missing:
        raise BuildError(f"apt cannot find packages: {', '.join(sorted(missing))}",
                         hint="run `apt-get update`; check /etc/apt/sources.list*")
    return out


def fetch_debs(packages: list[str], dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    files = package_uris(packages)
    want = [p for p, f in files.items() if not (dest / f).exists()]
    if want:
        run.run(["apt-get", *_APT_OPTS, "download", *want], cwd=dest, timeout=900,
                what="apt-get download")
    paths = {}
    for pkg, fname in files.items():
        path = dest / fname
        if not path.exists():  # apt escapes ':' of epochs as %3a in file names
            alt = dest / fname.replace("%3a", ":")
            cands = list(dest.glob(fname.split("_", 1)[0] + "_*.deb"))
            path = alt if alt.exists() else (cands[0] if cands else path)
        if not path.exists():
            raise BuildError(f"download of {pkg} did not produce {fname}")
        paths[pkg] = path
    return paths


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run.run(["dpkg-deb", "-x", str(deb), str(dest)], what="dpkg-deb -x")
