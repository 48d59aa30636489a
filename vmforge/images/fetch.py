"""Downloads into the library: HTTP(S), resumable, checksummed before anything is stored.

One pull per URL at a time (a flock in the library, dropped by the kernel if the puller dies),
each into its own partial file ``tmp/pull-<url hash>-<pid>.part``. A pull that waited for the
lock finds what the previous one stored; the partial file a dead pull left is resumed (HTTP
Range) by the next pull of that URL. What is stored is the file that was hashed, checked again
as it is stored. Without a checksum the transfer must be provably complete: a body that just
stops cannot be told from a cut one.
"""

from __future__ import annotations

import hashlib
import http.client
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
from .library import Image, Library, check_name, os_error, private_dir, private_opener

__all__ = ["pull", "download", "fetch_sha256sums"]

ProgressFn = Callable[[int, int | None], None]
CHUNK = 1 << 20
USER_AGENT = "vmforge/0.1"


class _Cut(Exception):
    """The transfer stopped short (worth resuming)."""


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
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise ImageError(f"cannot fetch checksums {url}: {exc}") from exc
    for line in text.splitlines():
        m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(\S+)$", line.strip())
        if m and (m.group(2) == filename or m.group(2).endswith("/" + filename)):
            return m.group(1).lower()
    raise ImageError(f"{url} lists no checksum for {filename}",
                     hint="check the file name or pass --sha256")


def _local(exc: OSError, url: str, dest: Path) -> ImageError:
    dest.unlink(missing_ok=True)  # a partial file on a full or unwritable disk is of no use
    return os_error(exc, f"cannot write the download of {url}", dest.parent)


def _transfer(url: str, dest: Path, progress: ProgressFn | None, timeout: float,
              sha256: str | None) -> tuple[str, bool, bool]:
    """One request, appending to what ``dest`` holds: (sha256 of ``dest``, whether the
    transfer is provably complete, whether it started at byte 0)."""
    h = hashlib.sha256()
    try:
        have = dest.stat().st_size if dest.exists() else 0
        if have:
            with open(dest, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
    except OSError as exc:
        raise _local(exc, url, dest) from exc
    if have and sha256 and h.hexdigest() == sha256:
        return sha256, True, False  # a pull that died had received it all
    with _open(url, have, timeout) as resp:
        start = 0
        if have and getattr(resp, "status", 200) == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != have:
                dest.unlink(missing_ok=True)
                raise _Cut("the server resumed at another offset; starting again")
            start = have
        else:  # a full body: the server ignored Range (or there was nothing to resume)
            h = hashlib.sha256()
        whole = re.match(r"bytes \d+-\d+/(\d+)$", resp.headers.get("Content-Range", ""))
        length = resp.headers.get("Content-Length")
        chunked = bool(getattr(resp, "chunked", False))
        total = (int(whole.group(1)) if start and whole else
                 start + int(length) if length and length.isdigit() and not chunked else None)
        done = start
        try:
            out = open(dest, "ab" if start else "wb", opener=private_opener)
        except OSError as exc:
            raise _local(exc, url, dest) from exc
        with out:
            while chunk := resp.read(CHUNK):  # network errors propagate: the caller retries
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _local(exc, url, dest) from exc
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if total is not None and done != total:
        raise _Cut(f"the transfer ended at {done} of {total} bytes")
    # http.client raises IncompleteRead unless a chunked body ends with its last chunk.
    return h.hexdigest(), total is not None or chunked, start == 0


def download(url: str, dest: Path, *, sha256: str | None = None,
             progress: ProgressFn | None = None, timeout: float = 60, retries: int = 3) -> str:
    """Download ``url`` to ``dest``, resuming what ``dest`` holds; returns its sha256.

    Without ``sha256`` the transfer must be provably complete (the announced length reached,
    or a chunked body's terminating chunk read). With it the digest decides, and a resumed
    file that does not match is fetched once more from the start. ``dest`` is kept on failure
    only where resuming it makes sense (the network failed, or we were interrupted).
    """
    attempt = 0
    while True:
        try:
            digest, complete, fresh = _transfer(url, dest, progress, timeout, sha256)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and dest.exists():  # what we hold is not a prefix of it
                dest.unlink()
                continue
            if exc.code in (401, 403, 404, 410):
                dest.unlink(missing_ok=True)
                raise ImageError(f"cannot download {url}: HTTP {exc.code}",
                                 hint="check the URL") from None
            error: Exception = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError,
                _Cut) as exc:
            error = exc
        else:
            if sha256 and digest != sha256:
                dest.unlink(missing_ok=True)
                if not fresh:  # resumed from a partial file that was not this content
                    continue
                hint = "nothing was stored; check the source" + (
                    "" if complete else " (it sent no length, so a cut transfer looks the "
                    "same: pull again)")
                raise ChecksumError(f"sha256 mismatch for {url}: got {digest}, expected "
                                    f"{sha256}", hint=hint)
            if not sha256 and not complete:
                dest.unlink(missing_ok=True)
                raise ImageError(
                    f"cannot tell whether the download of {url} is complete: the server sent "
                    "no length and no chunked encoding; nothing was stored",
                    hint="pass --sha256 or --sha256sums to verify it by its content")
            return digest
        attempt += 1
        if attempt > retries:
            raise ImageError(f"download of {url} failed: {error}",
                             hint="run the same pull again: it resumes") from error
        time.sleep(min(0.5 * attempt, 2))


def _pulled(library: Library, name: str, url: str, digest: str | None,
            since: float = 0) -> Image | None:
    """The latest version of ``name`` if it is this URL's content: ``digest``, or without one
    any pull of it recorded since ``since``."""
    img = library.find(name)
    if img is None or img.source != url:
        return None
    if (img.files.get("disk") != digest) if digest else img.created_at < since:
        return None
    return img


def _adopt(library: Library, key: str, part: Path) -> None:
    """Take over the partial files of dead pulls of this URL (we hold its lock, so none is
    alive): the longest is resumed, the others removed."""
    try:
        private_dir(library.tmp)
        *rest, best = sorted(library.tmp.glob(f"{key}*.part"),
                             key=lambda p: p.stat().st_size) or [part]
        for p in rest:
            p.unlink()
        if best != part:
            os.replace(best, part)
    except OSError as exc:
        raise os_error(exc, "cannot prepare the download", library.root) from exc


def pull(library: Library, url: str, name: str, *, sha256: str | None = None,
         sha256sums_url: str | None = None, progress: ProgressFn | None = None,
         timeout: float = 60, notice: Callable[[str], None] = lambda _m: None) -> Image:
    """Download, verify, then import into the library (nothing enters it unverified). Pulling
    what the latest version of ``name`` already is from ``url`` returns that version."""
    check_name(name)
    if not url.startswith(("http://", "https://")):
        raise ImageError(f"unsupported URL {url!r}", hint="use an http:// or https:// URL")
    filename = url.rstrip("/").rsplit("/", 1)[-1] or "image"
    if sha256sums_url:
        sha256 = fetch_sha256sums(sha256sums_url, filename, timeout)
    if sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ImageError(f"--sha256 {sha256!r} is not a sha256 hex digest")
    sha256 = sha256.lower() if sha256 else None
    key = "pull-" + hashlib.sha256(url.encode()).hexdigest()[:24]
    started = time.time()
    with library.lock(key, waiting=lambda: notice(f"waiting for another pull of {url}")):
        img = _pulled(library, name, url, sha256, started)  # e.g. by the pull we waited for
        if img and library.is_intact(img):
            return img
        part = library.tmp / f"{key}-{os.getpid()}.part"
        _adopt(library, key, part)
        digest = download(url, part, sha256=sha256, progress=progress, timeout=timeout)
        try:
            if img := _pulled(library, name, url, digest):  # already that: repair if damaged
                return img if library.is_intact(img) else library.attach(
                    img, {"disk": part}, move=True, sha256={"disk": digest})
            return import_disk(library, part, name, source=url, move=True, sha256=digest)
        finally:
            part.unlink(missing_ok=True)
