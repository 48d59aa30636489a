"""The local image library: a content-addressed store (sha256) plus a catalog in state.db.

An image is a name and version (``minimal:3``; ``minimal`` and ``minimal:latest`` mean the
newest) pointing at one or more stored files by role: ``disk``, ``kernel`` (bzImage),
``vmlinux`` (uncompressed, PVH), ``initrd``. Stored files are read-only, written once under a
temporary name, hashed, and linked into place, so a failed import leaves nothing behind.

Integrity: the catalog records each stored file's size and mtime beside its sha256 (the
``files`` column maps a role to ``{"sha256", "size", "mtime_ns"}``; rows written before that
map a role to the bare sha256). ``check_intact`` compares them on every use, a stat per file;
``verify`` re-hashes. Storing content that is already there re-hashes the stored copy and
replaces it if it is damaged, so pulling or building an image again repairs it.

Concurrency: flocks under ``locks/`` (the kernel drops them when a holder dies). Storing holds
``store`` shared and ``prune`` holds it exclusive, so a file stored but not yet recorded is
never pruned; pulls lock per URL and built-in images per name.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ChecksumError, ImageError
from ..fsutil import fsync_dir
from ..state import Database

__all__ = ["Library", "Image", "BlobCheck", "parse_ref", "check_name", "sha256_file",
           "os_error", "private_dir", "private_opener", "valid_role", "SNAPSHOT_KIND",
           "SNAPSHOT_ROLES", "LAYER_ROLE"]

REF_RE = re.compile(r"^(?P<name>[a-zA-Z0-9][a-zA-Z0-9._-]{0,62})(?::(?P<ver>\d+|latest))?$")
ROLES = ("disk", "kernel", "vmlinux", "initrd")
# A snapshot (kind "snapshot", vmforge.node.snapshots) stores its saved memory and device
# state, the UEFI variable store, and one read-only disk layer per disk ("layer:<disk id>").
SNAPSHOT_ROLES = ("state", "nvram")
LAYER_ROLE = "layer:"
SNAPSHOT_KIND = "snapshot"


def valid_role(role: str) -> bool:
    return role in ROLES or role in SNAPSHOT_ROLES or (
        role.startswith(LAYER_ROLE) and len(role) > len(LAYER_ROLE))
CHUNK = 1 << 20

Stamp = tuple[int, int]  # (size, mtime_ns) of a stored file, recorded with the image
DAMAGED: Stamp = (-1, -1)  # recorded by verify: refused on use until the content is stored again
Entries = dict[str, tuple[str, Stamp | None]]  # role -> (sha256, stamp if recorded)


def sha256_file(path: str | Path, bufsize: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def parse_ref(ref: str) -> tuple[str, int | None]:
    m = REF_RE.fullmatch(ref)
    if not m:
        raise ImageError(f"invalid image reference {ref!r}",
                         hint="use NAME or NAME:VERSION, e.g. debian:2 or debian:latest")
    ver = m.group("ver")
    return m.group("name"), (None if ver in (None, "latest") else int(ver))


def check_name(name: str) -> None:
    """A name to store a new version under (checked before any work is done for it)."""
    parse_ref(name)
    if ":" in name:
        raise ImageError(f"image name {name!r} must not carry a version",
                         hint="versions are assigned automatically")


def os_error(exc: OSError, what: str, where: Path) -> ImageError:
    """An OS failure as an ImageError: what failed, the OS's reason, the path and a fix."""
    path = exc.filename or where
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (f"free space on the filesystem holding {where} (df -h {where}); "
                "`vmforge image prune` deletes stored files no image uses")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = f"check the owner and mode of {path} and its directories, or use --data-dir"
    elif exc.errno == errno.EROFS:
        hint = f"{where} is on a read-only filesystem: use another --data-dir"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        hint = f"check that {path} is a directory vmforge may use, or use --data-dir"
    else:
        hint = None
    return ImageError(f"{what}: {exc.strerror or exc}: {path}", hint=hint)


def private_dir(path: Path) -> None:
    """Create an owner-only directory, like everything under the data directory."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def private_opener(path: str, flags: int) -> int:
    """``open(..., opener=private_opener)``: a new file is owner-only (0600)."""
    return os.open(path, flags, 0o600)


def _entries(files_json: str) -> Entries:
    out: Entries = {}
    for role, v in json.loads(files_json).items():
        if isinstance(v, str):  # recorded before stamps existed
            out[role] = (v, None)
        else:
            stamp = (int(v["size"]), int(v["mtime_ns"])) if "size" in v else None
            out[role] = (v["sha256"], stamp)
    return out


def _files_json(entries: Entries) -> str:
    return json.dumps({role: {"sha256": d, "size": s[0], "mtime_ns": s[1]} if s else d
                       for role, (d, s) in entries.items()})


def _uses(recipe: str | None) -> list[int]:
    """The image ids a snapshot's recipe says it builds on (vmforge.node.snapshots)."""
    try:
        uses = (json.loads(recipe or "null") or {}).get("uses") or []
    except (ValueError, AttributeError):
        return []
    return [int(i) for i in uses if isinstance(i, int)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@dataclass(frozen=True)
class Image:
    id: int
    name: str
    version: int
    kind: str
    format: str | None
    files: Mapping[str, str]  # role -> sha256
    cmdline: str | None
    parent_id: int | None
    source: str | None
    recipe: Mapping[str, Any] | None
    size: int
    virtual_size: int | None
    created_at: float
    paths: Mapping[str, Path] = field(default_factory=dict)
    stamps: Mapping[str, Stamp] = field(default_factory=dict)  # role -> recorded (size, mtime)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def path(self, role: str) -> Path | None:
        return self.paths.get(role)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "version": self.version, "ref": self.ref,
                "kind": self.kind, "format": self.format, "files": dict(self.files),
                "paths": {k: str(v) for k, v in self.paths.items()}, "cmdline": self.cmdline,
                "parent_id": self.parent_id, "source": self.source, "recipe": self.recipe,
                "size": self.size, "virtual_size": self.virtual_size,
                "created_at": self.created_at}


@dataclass(frozen=True)
class BlobCheck:
    """One stored file of one image, re-hashed by ``Library.verify``."""

    ref: str
    role: str
    sha256: str
    path: Path
    status: str  # ok | corrupt | missing | unreadable

    def as_dict(self) -> dict[str, str]:
        return {"ref": self.ref, "role": self.role, "sha256": self.sha256,
                "path": str(self.path), "status": self.status}


class Library:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root
        self.blobs = root / "blobs"
        #: raw conversions of qcow2 blobs (``<sha256>.raw``, for Firecracker), kept while
        #: their blob is
        self.raw_cache = root / "raw-cache"
        self.tmp = root / "tmp"
        self.locks = root / "locks"

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest

    # -- locking
    @contextmanager
    def lock(self, key: str, *, shared: bool = False,
             waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the flock ``locks/KEY.lock`` (exclusive unless ``shared``); ``waiting`` is
        called once if someone else holds it. The last holder removes the file, so locks leave
        nothing behind; a waiter that wakes on a removed file takes the new one instead."""
        path = self.locks / f"{key}.lock"
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:
            try:
                private_dir(self.locks)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise os_error(exc, "cannot create a lock file", self.root) from exc
            try:
                try:
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                except BlockingIOError:
                    if waiting is not None:
                        waiting()
                        waiting = None
                    fcntl.flock(fd, op)
                if _same_file(fd, path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only if nobody else holds it
                path.unlink(missing_ok=True)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)

    # -- storing
    def store_file(self, src: str | Path, *, expected_sha256: str | None = None,
                   move: bool = False) -> str:
        """Store a file (moved if ``move`` and on the same filesystem, else copied); returns
        its sha256. The stored file is exactly the bytes hashed here; read-only."""
        with self.lock("store", shared=True):
            digest, _ = self._store(Path(src), expected_sha256, move)
            stamps = {digest: self._stamp(digest)}
            self._write(lambda c: self._restamp(c, stamps))
        return digest

    def _store(self, src: Path, expected: str | None, move: bool) -> tuple[str, bool]:
        """Store one file; (its sha256, whether this call created the stored file)."""
        if not src.is_file():
            raise ImageError(f"file not found: {src}", hint="check the path")
        try:
            private_dir(self.blobs)
            private_dir(self.tmp)
            self._sweep()
            in_place = move and os.stat(src).st_dev == os.stat(self.tmp).st_dev
        except OSError as exc:
            raise os_error(exc, "cannot prepare the image store", self.root) from exc
        # Moving: the caller's own file (a private download) is hashed where it is and linked,
        # so what is stored is the very inode that was hashed. Copying: hash while copying.
        tmp = src if in_place else self.tmp / f"in-{os.getpid()}-{time.monotonic_ns()}"
        try:
            h = hashlib.sha256()
            with open(src, "rb") as fi:
                if in_place:
                    while chunk := fi.read(CHUNK):
                        h.update(chunk)
                    os.fsync(fi.fileno())
                else:
                    with open(tmp, "xb", opener=private_opener) as fo:
                        while chunk := fi.read(CHUNK):
                            h.update(chunk)
                            fo.write(chunk)
                        fo.flush()
                        os.fsync(fo.fileno())
            digest = h.hexdigest()
            if expected and digest != expected.lower():
                raise ChecksumError(f"sha256 mismatch for {src.name}: got {digest}, "
                                    f"expected {expected.lower()}",
                                    hint="the file is corrupt or the checksum is wrong")
            os.chmod(tmp, 0o444)
            created = self._place(tmp, digest)
        except OSError as exc:
            raise os_error(exc, f"cannot store {src}", self.root) from exc
        finally:
            tmp.unlink(missing_ok=True)  # moved: src itself, now linked into the store
        return digest, created

    def _place(self, tmp: Path, digest: str) -> bool:
        """Link a hashed file into the store; an existing copy is kept only if it is intact."""
        dest = self.blob_path(digest)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            if sha256_file(dest) == digest:
                return False
            os.replace(tmp, dest)  # a damaged copy: the bytes just hashed take its place
        fsync_dir(self.blobs)
        return True

    def _sweep(self) -> None:
        """Remove copies that a store killed mid-way left in tmp/ (their process is gone)."""
        for p in self.tmp.glob("in-*"):
            pid = p.name.split("-")[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                p.unlink(missing_ok=True)

    def _stamp(self, digest: str) -> Stamp:
        st = os.stat(self.blob_path(digest))
        return st.st_size, st.st_mtime_ns

    def _restamp(self, c: sqlite3.Connection, stamps: Mapping[str, Stamp]) -> None:
        """Record the current size and mtime of files just hashed for every image that uses
        them (a repaired file has a new mtime; rows from before stamps get one)."""
        for digest, stamp in stamps.items():
            rows = c.execute("SELECT id, files FROM images WHERE files LIKE ?",
                             (f"%{digest}%",)).fetchall()
            for row in rows:
                entries = _entries(row["files"])
                if any(d == digest and s != stamp for d, s in entries.values()):
                    new = {r: (d, stamp if d == digest else s) for r, (d, s) in entries.items()}
                    c.execute("UPDATE images SET files=? WHERE id=?", (_files_json(new), row[0]))

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """One catalog transaction; a failing database (full disk) is an ImageError."""
        try:
            with self.db.tx() as c:
                return fn(c)
        except sqlite3.Error as exc:
            where = self.db.path.parent
            try:
                full = shutil.disk_usage(where).free < (1 << 20)
            except OSError:
                full = False
            hint = (f"the filesystem holding {where} is full: free space (df -h {where})"
                    if full or "full" in str(exc) else None)
            raise ImageError(f"cannot update the image catalog {self.db.path}: {exc}",
                             hint=hint) from exc

    def _commit(self, files: Mapping[str, str | Path], move: bool,
                sha256: Mapping[str, str] | None,
                record: Callable[[sqlite3.Connection, Entries], int]) -> Image:
        """Store ``files`` and record them with ``record`` in one transaction; on any failure
        the files this call added to the store are removed again."""
        unknown = {r for r in files if not valid_role(r)}
        if unknown:
            raise ImageError(f"unknown file roles: {sorted(unknown)}")
        created: list[str] = []
        try:
            with self.lock("store", shared=True):
                digests: dict[str, str] = {}
                for role, p in files.items():
                    digests[role], new = self._store(Path(p), (sha256 or {}).get(role), move)
                    if new:
                        created.append(digests[role])

                def tx(c: sqlite3.Connection) -> int:
                    stamps = {d: self._stamp(d) for d in set(digests.values())}
                    image_id = record(c, {r: (d, stamps[d]) for r, d in digests.items()})
                    self._restamp(c, stamps)
                    return image_id
                image_id: int = self._write(tx)
        except BaseException:
            self._discard(created)
            raise
        return self.get(image_id)

    def _discard(self, digests: Sequence[str]) -> None:
        if not digests:
            return
        try:
            with self.lock("store"):  # exclusive: no other store is between storing and recording
                used = self._used()
                for d in set(digests) - used:
                    self.blob_path(d).unlink(missing_ok=True)
        except (ImageError, OSError, sqlite3.Error):
            pass  # prune finishes the job

    def add(self, name: str, files: Mapping[str, str | Path], *, kind: str,
            format: str | None = None, cmdline: str | None = None,
            parent: Image | None = None, source: str | None = None,
            recipe: Mapping[str, Any] | None = None, virtual_size: int | None = None,
            move: bool = False, sha256: Mapping[str, str] | None = None,
            on_record: Callable[[sqlite3.Connection, int], None] | None = None) -> Image:
        """Store ``files`` (role -> path) as the next version of ``name``. ``sha256`` (role ->
        digest) is checked against the bytes as they are stored. ``on_record(c, image_id)``
        runs in the transaction that records the image (e.g. pins it to a VM)."""
        check_name(name)

        def record(c: sqlite3.Connection, entries: Entries) -> int:
            kinds = {r[0] for r in c.execute("SELECT DISTINCT kind FROM images WHERE name=?",
                                             (name,))}
            if kinds and (kind == SNAPSHOT_KIND) != (SNAPSHOT_KIND in kinds):
                other = "an image" if kind == SNAPSHOT_KIND else "a snapshot"
                raise ImageError(f"{name!r} is the name of {other} already: snapshots and "
                                 "images do not share names", hint="pick another name")
            row = c.execute("SELECT COALESCE(MAX(version), 0) FROM images WHERE name=?",
                            (name,)).fetchone()
            size = sum({d: s[0] for d, s in entries.values() if s}.values())
            cur = c.execute(
                "INSERT INTO images (name, version, kind, format, files, cmdline, parent_id, "
                "source, recipe, size, virtual_size, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, int(row[0]) + 1, kind, format, _files_json(entries), cmdline,
                 parent.id if parent else None, source,
                 json.dumps(recipe) if recipe is not None else None, size, virtual_size,
                 time.time()))
            assert cur.lastrowid is not None
            if on_record is not None:
                on_record(c, cur.lastrowid)
            return cur.lastrowid
        return self._commit(files, move, sha256, record)

    def attach(self, image: Image, files: Mapping[str, str | Path], *,
               cmdline: str | None = None, move: bool = False,
               sha256: Mapping[str, str] | None = None) -> Image:
        """Store files for an existing image under their roles (more of them, e.g. the kernel
        and initrd read from its disk; or the same content again, which repairs a damaged
        copy) and set its command line if it has none."""
        def record(c: sqlite3.Connection, entries: Entries) -> int:
            row = c.execute("SELECT files FROM images WHERE id=?", (image.id,)).fetchone()
            if row is None:
                raise ImageError(f"image {image.ref} was removed meanwhile")
            merged = {**_entries(row[0]), **entries}
            size = sum(self.blob_path(d).stat().st_size for d, _ in merged.values())
            c.execute("UPDATE images SET files=?, size=?, cmdline=COALESCE(cmdline, ?) "
                      "WHERE id=?", (_files_json(merged), size, cmdline, image.id))
            return image.id
        return self._commit(files, move, sha256, record)

    # -- integrity
    def is_intact(self, image: Image) -> bool:
        try:
            self.check_intact(image)
        except ImageError:
            return False
        return True

    def check_intact(self, image: Image, roles: Callable[[str], bool] | None = None) -> None:
        """Refuse an image whose stored files changed since they were recorded: one stat per
        file, comparing size and mtime (``verify`` re-hashes). Files recorded before sizes
        and mtimes were kept pass until a verify records them. ``roles``: check only the
        files whose role it accepts."""
        rows = self.db.query("SELECT files FROM images WHERE id=?", (image.id,))
        entries = _entries(rows[0][0]) if rows else {
            r: (d, image.stamps.get(r)) for r, d in image.files.items()}
        if roles is not None:
            entries = {r: e for r, e in entries.items() if roles(r)}
        again = (f"pull, import or build {image.name} again: storing the same content "
                 "replaces the damaged file")
        for role, (digest, stamp) in entries.items():
            path = self.blob_path(digest)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise ImageError(f"image {image.ref}: its {role} file {path} is missing",
                                 hint=again) from None
            except OSError as exc:
                raise os_error(exc, f"image {image.ref}: cannot read its {role} file",
                               path) from exc
            if stamp == DAMAGED:
                raise ImageError(f"image {image.ref}: its {role} file {path} failed "
                                 f"verification (its content is not sha256 {digest})",
                                 hint=again)
            if stamp is not None and stamp != (st.st_size, st.st_mtime_ns):
                raise ImageError(
                    f"image {image.ref}: its {role} file {path} changed since it was stored "
                    f"(size {st.st_size}, mtime {st.st_mtime_ns} ns; recorded {stamp[0]}, "
                    f"{stamp[1]} ns)",
                    hint=f"`vmforge image verify {image.ref}` re-hashes it and accepts it "
                         f"again if it is intact; if it is damaged, {again}")

    def verify(self, images: Sequence[Image],
               progress: Callable[[str], None] = lambda _m: None) -> list[BlobCheck]:
        """Re-hash the stored files of ``images`` (a file shared by several, once). Intact
        files have their size and mtime recorded again, so a data directory copied without
        mtimes passes the cheap check after this; damaged ones are marked, so every use
        refuses them until their content is stored again."""
        status: dict[str, str] = {}
        stamps: dict[str, Stamp] = {}
        for img in images:
            for digest in img.files.values():
                if digest in status:
                    continue
                progress(f"{img.ref} {digest[:12]}")
                path = self.blob_path(digest)
                try:
                    st = os.stat(path)
                    ok = sha256_file(path) == digest
                    status[digest] = "ok" if ok else "corrupt"
                    stamps[digest] = (st.st_size, st.st_mtime_ns) if ok else DAMAGED
                except FileNotFoundError:
                    status[digest], stamps[digest] = "missing", DAMAGED
                except OSError:
                    status[digest], stamps[digest] = "unreadable", DAMAGED
        if stamps:
            self._write(lambda c: self._restamp(c, stamps))
        return [BlobCheck(img.ref, role, d, self.blob_path(d), status[d])
                for img in images for role, d in img.files.items()]

    # -- lookups
    def _image(self, row: Any) -> Image:
        entries = _entries(row["files"])
        return Image(
            id=row["id"], name=row["name"], version=row["version"], kind=row["kind"],
            format=row["format"], files={r: d for r, (d, _) in entries.items()},
            cmdline=row["cmdline"], parent_id=row["parent_id"], source=row["source"],
            recipe=json.loads(row["recipe"]) if row["recipe"] else None, size=row["size"],
            virtual_size=row["virtual_size"], created_at=row["created_at"],
            paths={r: self.blob_path(d) for r, (d, _) in entries.items()},
            stamps={r: s for r, (_, s) in entries.items() if s})

    def get(self, image_id: int) -> Image:
        rows = self.db.query("SELECT * FROM images WHERE id=?", (image_id,))
        if not rows:
            raise ImageError(f"no image with id {image_id}")
        return self._image(rows[0])

    def find(self, ref: str) -> Image | None:
        name, ver = parse_ref(ref)
        if ver is None:
            rows = self.db.query("SELECT * FROM images WHERE name=? ORDER BY version DESC "
                                 "LIMIT 1", (name,))
        else:
            rows = self.db.query("SELECT * FROM images WHERE name=? AND version=?", (name, ver))
        return self._image(rows[0]) if rows else None

    def resolve(self, ref: str, field: str = "image") -> Image:
        img = self.find(ref)
        if img is None:
            names = sorted({r["name"] for r in self.db.query("SELECT name FROM images")})
            hint = (f"known images: {', '.join(names)}" if names else
                    "the library is empty: `vmforge image build minimal` or `vmforge image pull`")
            raise ImageError(f"{field}: no image {ref!r} in the library", hint=hint)
        return img

    def all(self) -> list[Image]:
        return [self._image(r) for r in
                self.db.query("SELECT * FROM images ORDER BY name, version")]

    def users(self, image: Image) -> tuple[list[str], list[str]]:
        vms = [r["vm_name"] for r in
               self.db.query("SELECT vm_name FROM vm_images WHERE image_id=?", (image.id,))]
        children = [f"{r['name']}:{r['version']}" for r in
                    self.db.query("SELECT name, version FROM images WHERE parent_id=?",
                                  (image.id,))]
        return vms, children

    def lineage(self, image: Image) -> list[str]:
        out = []
        cur: Image | None = image
        while cur is not None and cur.parent_id is not None:
            cur = self.get(cur.parent_id)
            out.append(cur.ref)
        return out

    # -- removal
    def remove(self, ref: str) -> Image:
        img = self.resolve(ref)

        def delete(c: sqlite3.Connection) -> None:
            vms = [r[0] for r in c.execute("SELECT vm_name FROM vm_images WHERE image_id=?",
                                           (img.id,))]
            kids = [f"{r[0]}:{r[1]}" for r in c.execute(
                "SELECT name, version FROM images WHERE parent_id=?", (img.id,))]
            kids += [f"{r[0]}:{r[1]}" for r in c.execute(  # snapshots build on all they use
                "SELECT name, version, recipe FROM images WHERE kind=? AND parent_id IS NOT ?",
                (SNAPSHOT_KIND, img.id)) if img.id in _uses(r[2])]
            if vms or kids:
                users = [f"VM {v}" for v in vms] + [f"image {k}" for k in kids]
                raise ImageError(f"image {img.ref} is in use by {', '.join(users)}",
                                 hint="remove those first (vmforge rm / vmforge image rm)")
            c.execute("DELETE FROM images WHERE id=?", (img.id,))
        self._write(delete)
        self.prune()
        return img

    def _used(self) -> set[str]:
        return {d for r in self.db.query("SELECT files FROM images")
                for d, _ in _entries(r["files"]).values()}

    def prune(self) -> list[str]:
        """Delete stored files no image refers to (and their raw conversions), and leftovers
        of interrupted imports and conversions."""
        removed = []
        with self.lock("store"):  # no store is between storing a file and recording it
            used = self._used()
            try:
                if self.blobs.exists():
                    for p in self.blobs.iterdir():
                        if p.name not in used:
                            p.unlink()
                            removed.append(p.name)
                if self.raw_cache.exists():
                    old = time.time() - 3600
                    for p in self.raw_cache.iterdir():
                        if p.name.startswith("."):  # a conversion under way, or a dead one's
                            if p.stat().st_mtime < old:
                                p.unlink()
                        elif p.name.removesuffix(".raw") not in used:
                            p.unlink()
                            removed.append(p.name)
                if self.tmp.exists():  # copies of dead stores; old partial downloads
                    self._sweep()
                    cutoff = time.time() - 3600
                    for p in self.tmp.iterdir():
                        if p.stat().st_mtime < cutoff:
                            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            except OSError as exc:
                raise os_error(exc, "cannot prune the image store", self.root) from exc
        return removed
