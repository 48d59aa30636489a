"""The one SQLite file holding VM state and the image catalog.

WAL mode and a busy timeout let the CLI, the daemon and tests share it; every change is one
transaction, so a failure never leaves half a row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Database"]

SCHEMA = """
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


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), timeout=30, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(vms)")}
        if "agent_endpoint" not in cols:  # state files of earlier versions
            self._conn.execute("ALTER TABLE vms ADD COLUMN agent_endpoint TEXT")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: writers serialise here, readers are never blocked."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        return list(self._conn.execute(sql, params))

    def close(self) -> None:
        self._conn.close()
