"""Where the engine keeps its secrets: a small key-value protocol and two stores.

The engine serializes its own records; a store only has to write a batch of them
atomically and durably. :class:`SqliteKeyStore` is the file-backed one: mode 0600,
WAL, ``synchronous=FULL`` (a committed reservation survives power loss, not just a
process crash) and ``secure_delete`` so dropped chain keys are overwritten on disk.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fieldchat.schemas.errors import KeyStoreError

__all__ = [
    "SEND_CHAIN_PREFIX",
    "KeyStore",
    "MemoryKeyStore",
    "SqliteKeyStore",
    "create_private_file",
    "write_records",
]


def create_private_file(path: Path, what: str) -> None:
    """Create ``path`` mode 0600 (before SQLite opens it, so it is never readable by others).

    Raises:
        KeyStoreError: it cannot be created, or an existing file is readable by others.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise KeyStoreError(f"cannot create {what} {path}: {exc}") from exc
    if mode & 0o077:
        raise KeyStoreError(
            f"{what} {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
        )


def write_records(db: sqlite3.Connection, table: str, items: Mapping[str, Any]) -> None:
    """Upsert ``key -> value`` rows of a two-column table; a ``None`` value deletes the key.

    The caller holds the transaction; ``table`` is one of our own table names.
    """
    for key, value in items.items():
        if value is None:
            db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))  # noqa: S608
        else:
            db.execute(
                f"INSERT INTO {table} (key, value) VALUES (?, ?) "  # noqa: S608
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


# The engine's sending-chain records (reservations, PROTOCOL.md §6.3) live under this
# prefix. A store that defers fsyncs (:class:`device.state.DeviceState`) still makes
# them power-safe before anything sealed under them can leave: a reservation lost in
# a power cut would mean steps, hence keys and nonces, used twice.
SEND_CHAIN_PREFIX = "send/"


class KeyStore(Protocol):
    """Durable key-value records of the engine."""

    def load(self, key: str) -> bytes | None:
        """The record under ``key``, or ``None``."""
        ...

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every record whose key starts with ``prefix``."""
        ...

    def save(self, items: Mapping[str, bytes | None]) -> None:
        """Write all items atomically and durably before returning; ``None`` deletes.

        A store may instead let the write join a transaction of its caller's
        (:class:`device.state.DeviceState`): it is then kept only if that commits.
        """
        ...

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` if the writes since the open transaction began roll back.

        Lets the engine keep memory in step with the disk: what it adopted after a
        :meth:`save` that joined a transaction is undone with it (PROTOCOL.md §6.3).
        Stores whose :meth:`save` commits by itself never call it.
        """
        ...


class MemoryKeyStore:
    """In-memory store for tests and benchmarks (nothing survives the process)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self.writes = 0

    def load(self, key: str) -> bytes | None:
        return self._data.get(key)

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self._data.items() if k.startswith(prefix)}

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Nothing to undo: each :meth:`save` stands alone."""

    def save(self, items: Mapping[str, bytes | None]) -> None:
        self.writes += 1
        for key, value in items.items():
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = value


class SqliteKeyStore:
    """Key store in one SQLite file created with mode 0600.

    Raises:
        KeyStoreError: from the constructor when the file cannot be opened or is
            readable by others; from ``save``/``load`` when SQLite fails.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        create_private_file(self.path, "key store")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"cannot open key store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                side.chmod(0o600)

    def load(self, key: str) -> bytes | None:
        try:
            with self._lock:
                row = self._db.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store read failed: {exc}") from exc
        return None if row is None else bytes(row[0])

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        upper = prefix + "\U0010ffff"
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT key, value FROM records WHERE key >= ? AND key < ?", (prefix, upper)
                ).fetchall()
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store read failed: {exc}") from exc
        return {k: bytes(v) for k, v in rows}

    def save(self, items: Mapping[str, bytes | None]) -> None:
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    write_records(self._db, "records", items)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store write failed: {exc}") from exc

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Nothing to undo: each :meth:`save` commits by itself."""

    def close(self) -> None:
        with self._lock:
            self._db.close()
