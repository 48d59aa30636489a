"""Downloads into the library: HTTP(S), resumable, checksummed before anything is stored.

The partial file lives in the library's tmp/ under a name derived from the URL, so an
interrupted pull resumes (HTTP Range) on the next try; a checksum mismatch deletes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ChecksumError, ImageError
from .importing import import_disk
from .library import Image, Library

__all__ = ["pull", "download", "fetch_sha256sums"]

ProgressFn = Callable[[int, int | None], None]
CHUNK = 1 << 20
USER_AGENT = "vmforge/0.1"


def _open(url: str, start: int, timeout: float) -> Any:
    if not url.startswith(("http://", "https://")):
        raise ImageError(f"unsupported URL {url!r}", hint="use an http:// or https:// URL")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        req.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(req, timeout=timeout)


def fetch_sha256sums(url: str, filename: str, timeout: float = 60) -> str:
    """The sha256 that a SHA256SUMS file lists for ``filename``."""
    try:
        with _open(url, 0, timeout) as resp:
            text = resp.read(4 << 20).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise ImageError(f"cannot fetch checksums {url}: {exc}") from exc
    for line in text.splitlines():
        m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(\S+)$", line.strip())
        if m and (m.group(2) == filename or m.group(2).endswith("/" + filename)):
            return m.group(1).lower()
    raise ImageError(f"{url} lists no checksum for {filename}",
                     hint="check the file name or pass --sha256")


def download(url: str, dest: Path, *, progress: ProgressFn | None = None,
             timeout: float = 60, retries: int = 3) -> str:
    """Download ``url`` to ``dest`` (resuming what is there); returns the sha256."""
    attempt = 0
    while True:
        have = dest.stat().st_size if dest.exists() else 0
        try:
            with _open(url, have, timeout) as resp:
                status = getattr(resp, "status", 200)
                if have and status != 206:  # the server ignored Range: start again
                    have = 0
                length = resp.headers.get("Content-Length")
                total = (int(length) + have) if length is not None else None
                h = hashlib.sha256()
                if have:
                    with open(dest, "rb") as f:
                        while chunk := f.read(CHUNK):
                            h.update(chunk)
                with open(dest, "ab" if have else "wb") as out:
                    done = have
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                if total is not None and done != total:
                    raise ImageError(f"download ended at {done} of {total} bytes")
                return h.hexdigest()
        except (urllib.error.URLError, OSError, ImageError, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (404, 403, 401, 410):
                raise ImageError(f"cannot download {url}: HTTP {exc.code}") from None
            attempt += 1
            if attempt > retries:
                raise ImageError(f"download of {url} failed: {exc}",
                                 hint="run the same pull again: it resumes") from exc
            time.sleep(min(0.5 * attempt, 2))


def pull(library: Library, url: str, name: str, *, sha256: str | None = None,
         sha256sums_url: str | None = None, progress: ProgressFn | None = None,
         timeout: float = 60) -> Image:
    """Download, verify, then import into the library (nothing enters it unverified)."""
    filename = url.rstrip("/").rsplit("/", 1)[-1] or "image"
    if sha256sums_url:
        sha256 = fetch_sha256sums(sha256sums_url, filename, timeout)
    if sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ImageError(f"--sha256 {sha256!r} is not a sha256 hex digest")
    library.tmp.mkdir(parents=True, exist_ok=True)
    part = library.tmp / ("pull-" + hashlib.sha256(url.encode()).hexdigest()[:24] + ".part")
    digest = download(url, part, progress=progress, timeout=timeout)
    if sha256 and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(f"sha256 mismatch for {url}: got {digest}, expected "
                            f"{sha256.lower()}", hint="nothing was stored; check the source")
    try:
        return import_disk(library, part, name, source=url, move=True)
    finally:
        part.unlink(missing_ok=True)
        os.sync()
