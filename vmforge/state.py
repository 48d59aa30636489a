"""The one SQLite file holding VM state and the image catalog.

WAL mode and a busy timeout let the CLI, the daemon and tests share it; every change is one
transaction, so a failure never leaves half a row. Each thread gets its own connection (a
daemon's worker threads must not interleave transactions on one connection).

The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[n]`` upgrades version ``n``
to ``n + 1`` in place, in one transaction. Version 1 is the schema of vmforge 0.1 (files
written before versioning read as 0 with tables present, and are treated as 1).

The file is owner-only (0600), like everything under the data directory: stored specs may
carry passwords in user-data.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import VmforgeError

__all__ = ["Database", "SCHEMA_VERSION", "StateError"]


class StateError(VmforgeError):
    """The state file cannot be opened or written (disk full, permissions, corruption)."""


SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS vms (
    name        TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    dir         TEXT NOT NULL,
    pid         INTEGER,
    accel       TEXT,
    created_at  REAL NOT NULL,
    started_at  REAL,
    ready_at    REAL,
    stopped_at  REAL,
    owner_pid   INTEGER,
    last_error  TEXT,
    agent_endpoint TEXT
);
CREATE TABLE IF NOT EXISTS images (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    format      TEXT,
    files       TEXT NOT NULL,
    cmdline     TEXT,
    parent_id   INTEGER REFERENCES images(id),
    source      TEXT,
    recipe      TEXT,
    size        INTEGER NOT NULL DEFAULT 0,
    virtual_size INTEGER,
    created_at  REAL NOT NULL,
    UNIQUE(name, version)
);
CREATE TABLE IF NOT EXISTS vm_images (
    vm_name     TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
    image_id    INTEGER NOT NULL REFERENCES images(id),
    PRIMARY KEY (vm_name, image_id)
);
"""


def _v1_to_v2(c: sqlite3.Connection) -> None:
    """Runtime handles instead of QEMU-shaped columns; pins by role; a stop reason."""
    c.execute("ALTER TABLE vms ADD COLUMN backend TEXT NOT NULL DEFAULT 'qemu'")
    c.execute("ALTER TABLE vms ADD COLUMN runtime TEXT")
    c.execute("ALTER TABLE vms ADD COLUMN stop_reason TEXT")
    c.execute("ALTER TABLE vms ADD COLUMN spec_rev INTEGER")  # see vmforge.enums.SPEC_REV
    for row in c.execute("SELECT name, dir, pid, accel, agent_endpoint FROM vms "
                         "WHERE pid IS NOT NULL").fetchall():
        # A v1 row recorded QEMU's pid and its QMP socket in the VM directory.
        from .paths import VmPaths
        qmp = str(VmPaths(Path(row[1])).sockets / "qmp.sock")
        ep = row[4]
        agent = None
        if ep and ep.startswith("vsock:"):
            _, cid, port = ep.split(":")
            agent = {"kind": "vsock", "cid": int(cid), "port": int(port)}
        else:
            agent = {"kind": "unix", "path": ep or str(VmPaths(Path(row[1])).agent)}
        rt = {"backend": "qemu", "accel": row[3] or "tcg", "control": qmp, "agent": agent,
              "pid": row[2], "marker": qmp, "extra": {}}
        c.execute("UPDATE vms SET runtime=? WHERE name=?", (json.dumps(rt), row[0]))
    c.execute("""CREATE TABLE vm_images_v2 (
        vm_name  TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        role     TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id),
        PRIMARY KEY (vm_name, role))""")
    # v1 pinned without roles: keep the pins (rm/prune stay refused) under a legacy role.
    c.execute("INSERT INTO vm_images_v2 SELECT vm_name, 'legacy:' || image_id, image_id "
              "FROM vm_images")
    c.execute("DROP TABLE vm_images")
    c.execute("ALTER TABLE vm_images_v2 RENAME TO vm_images")


def _v2_to_v3(c: sqlite3.Connection) -> None:
    """Managed networks (vmforge.net), the VMs' NICs on them, and the guest's last reported
    interfaces. A network referenced by a NIC cannot be deleted (the foreign key); a VM's
    NICs go with its row."""
    c.execute("""CREATE TABLE networks (
        name       TEXT PRIMARY KEY,
        subnet     TEXT NOT NULL,
        bridge     TEXT NOT NULL UNIQUE,
        mode       TEXT NOT NULL,
        created_at REAL NOT NULL,
        options    TEXT NOT NULL DEFAULT '{}')""")
    c.execute("""CREATE TABLE vm_nics (
        vm_name TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        nic_id  TEXT NOT NULL,
        network TEXT NOT NULL REFERENCES networks(name),
        mac     TEXT NOT NULL,
        ip      TEXT,
        PRIMARY KEY (vm_name, nic_id),
        UNIQUE (network, mac),
        UNIQUE (network, ip))""")
    c.execute("ALTER TABLE vms ADD COLUMN guest_net TEXT")


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3}
SCHEMA_VERSION = 3


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            elif path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            self._migrate(self._conn())
        except (sqlite3.Error, OSError) as exc:
            raise _state_error(exc, path) from None

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # under the lock
            has_tables = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name='vms'").fetchone() is not None
            if version == 0:
                for stmt in SCHEMA_V1.split(";"):  # executescript would COMMIT first
                    if stmt.strip():
                        conn.execute(stmt)
                version = 1
                if has_tables:  # written before versioning: may lack the last v1 column
                    cols = {r[1] for r in conn.execute("PRAGMA table_info(vms)")}
                    if "agent_endpoint" not in cols:
                        conn.execute("ALTER TABLE vms ADD COLUMN agent_endpoint TEXT")
            if version > SCHEMA_VERSION:
                raise StateError(f"{self.path} was written by a newer vmforge (schema "
                                 f"{version}, this one knows {SCHEMA_VERSION})",
                                 hint="upgrade vmforge")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
            conn.execute(f"PRAGMA user_version={version}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: writers serialise here, readers are never blocked."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _state_error(exc, self.path) from None
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _state_error(exc, self.path) from None

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._conn().execute(sql, params))
        except sqlite3.OperationalError as exc:
            raise _state_error(exc, self.path) from None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # opened by a thread that has ended
                    pass
            self._all.clear()
        self._local = threading.local()


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _state_error(exc: BaseException, path: Path) -> StateError:
    text = str(exc)
    # SQLite says "disk I/O error" when it cannot create its WAL index on a full disk.
    if "full" in text or getattr(exc, "errno", None) == 28 or _disk_full(path):
        return StateError(f"the state file {path} cannot be written: the disk is full",
                          hint=f"free space on the filesystem holding {path.parent}")
    if isinstance(exc, PermissionError) or "readonly" in text or "permission" in text.lower():
        return StateError(f"the state file {path} is not writable: {text}",
                          hint="run vmforge as the user who owns the data directory")
    return StateError(f"the state file {path} cannot be used: {text}",
                      hint="check the disk; `vmforge doctor` shows the data directory")
