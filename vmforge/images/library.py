"""The local image library: a content-addressed store (sha256) plus a catalog in state.db.

An image is a name and version (``minimal:3``; ``minimal`` and ``minimal:latest`` mean the
newest) pointing at one or more stored files by role: ``disk``, ``kernel`` (bzImage),
``vmlinux`` (uncompressed, PVH), ``initrd``. Stored files are read-only, written once under a
temporary name and renamed into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ChecksumError, ImageError
from ..state import Database

__all__ = ["Library", "Image", "parse_ref", "sha256_file"]

REF_RE = re.compile(r"^(?P<name>[a-zA-Z0-9][a-zA-Z0-9._-]{0,62})(?::(?P<ver>\d+|latest))?$")
ROLES = ("disk", "kernel", "vmlinux", "initrd")


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def parse_ref(ref: str) -> tuple[str, int | None]:
    m = REF_RE.match(ref)
    if not m:
        raise ImageError(f"invalid image reference {ref!r}",
                         hint="use NAME or NAME:VERSION, e.g. debian:2 or debian:latest")
    ver = m.group("ver")
    return m.group("name"), (None if ver in (None, "latest") else int(ver))


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


class Library:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest

    # -- storing
    def store_file(self, src: str | Path, *, expected_sha256: str | None = None,
                   move: bool = False) -> str:
        """Copy (or move) a file into the store; returns its sha256. Atomic; read-only result."""
        src = Path(src)
        if not src.is_file():
            raise ImageError(f"file not found: {src}")
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"in-{os.getpid()}-{time.monotonic_ns()}"
        try:
            h = hashlib.sha256()
            if move and os.stat(src).st_dev == os.stat(self.tmp).st_dev:
                os.replace(src, tmp)
                digest = sha256_file(tmp)
            else:
                with open(src, "rb") as fi, open(tmp, "wb") as fo:
                    while chunk := fi.read(1 << 20):
                        h.update(chunk)
                        fo.write(chunk)
                digest = h.hexdigest()
            if expected_sha256 and digest != expected_sha256.lower():
                raise ChecksumError(f"sha256 mismatch for {src.name}: got {digest}, "
                                    f"expected {expected_sha256}",
                                    hint="the file is corrupt or the checksum is wrong")
            os.chmod(tmp, 0o444)
            dest = self.blob_path(digest)
            if dest.exists():
                tmp.unlink()
            else:
                os.replace(tmp, dest)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def add(self, name: str, files: Mapping[str, str | Path], *, kind: str,
            format: str | None = None, cmdline: str | None = None,
            parent: Image | None = None, source: str | None = None,
            recipe: Mapping[str, Any] | None = None, virtual_size: int | None = None,
            move: bool = False) -> Image:
        parse_ref(name)
        if ":" in name:
            raise ImageError(f"image name {name!r} must not carry a version",
                             hint="versions are assigned automatically")
        unknown = set(files) - set(ROLES)
        if unknown:
            raise ImageError(f"unknown file roles: {sorted(unknown)}")
        digests = {role: self.store_file(p, move=move) for role, p in files.items()}
        size = sum(self.blob_path(d).stat().st_size for d in set(digests.values()))
        with self.db.tx() as c:
            row = c.execute("SELECT COALESCE(MAX(version), 0) FROM images WHERE name=?",
                            (name,)).fetchone()
            version = int(row[0]) + 1
            cur = c.execute(
                "INSERT INTO images (name, version, kind, format, files, cmdline, parent_id, "
                "source, recipe, size, virtual_size, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, version, kind, format, json.dumps(digests), cmdline,
                 parent.id if parent else None, source,
                 json.dumps(recipe) if recipe is not None else None, size, virtual_size,
                 time.time()))
            image_id = cur.lastrowid
        assert image_id is not None
        return self.get(image_id)

    # -- lookups
    def _image(self, row: Any) -> Image:
        files = json.loads(row["files"])
        return Image(
            id=row["id"], name=row["name"], version=row["version"], kind=row["kind"],
            format=row["format"], files=files, cmdline=row["cmdline"],
            parent_id=row["parent_id"], source=row["source"],
            recipe=json.loads(row["recipe"]) if row["recipe"] else None, size=row["size"],
            virtual_size=row["virtual_size"], created_at=row["created_at"],
            paths={role: self.blob_path(d) for role, d in files.items()})

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
        with self.db.tx() as c:
            vms = [r[0] for r in c.execute("SELECT vm_name FROM vm_images WHERE image_id=?",
                                           (img.id,))]
            kids = [f"{r[0]}:{r[1]}" for r in c.execute(
                "SELECT name, version FROM images WHERE parent_id=?", (img.id,))]
            if vms or kids:
                users = [f"VM {v}" for v in vms] + [f"image {k}" for k in kids]
                raise ImageError(f"image {img.ref} is in use by {', '.join(users)}",
                                 hint="remove those first (vmforge rm / vmforge image rm)")
            c.execute("DELETE FROM images WHERE id=?", (img.id,))
        self.prune()
        return img

    def prune(self) -> list[str]:
        """Delete stored files no image refers to, and leftovers of interrupted imports."""
        used: set[str] = set()
        for r in self.db.query("SELECT files FROM images"):
            used.update(json.loads(r["files"]).values())
        removed = []
        if self.blobs.exists():
            for p in self.blobs.iterdir():
                if p.name not in used:
                    p.chmod(0o644)
                    p.unlink()
                    removed.append(p.name)
        if self.tmp.exists():  # leftovers of imports that died; live ones are recent
            cutoff = time.time() - 3600
            for p in self.tmp.iterdir():
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        return removed
