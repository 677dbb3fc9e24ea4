"""The broker's SQLite store: accounts, membership overrides, rosters, sessions,
queued messages and retained messages (payloads as BLOBs: ours are binary).

Two ways in:

* :class:`Store`: synchronous, one short transaction per call. The admin commands
  (``fieldchat broker enroll`` …, possibly in another process while the broker runs)
  and the broker's start-up load use it.
* :class:`broker._writebehind.WriteBehind`: one thread that owns a connection and
  applies the running broker's writes in group-committed batches.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fieldchat.broker._credentials import hash_credential, new_credential
from fieldchat.broker._errors import UnknownAccount
from fieldchat.schemas.errors import ConfigError, FieldchatError
from fieldchat.schemas.ids import validate_id
from fieldchat.schemas.roster import Roster

__all__ = [
    "Account",
    "Role",
    "Store",
    "StoredMessage",
    "StoredSession",
    "gateway_username",
]

log = logging.getLogger(__name__)

Role = Literal["participant", "gateway"]
_SCHEMA_VERSION = 2  # 2: MQTT 5 session expiry; message properties, expiry, in-flight id
_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts(
    username TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS overrides(
    pid TEXT NOT NULL, cid TEXT NOT NULL, allow INTEGER NOT NULL, PRIMARY KEY(pid, cid));
CREATE TABLE IF NOT EXISTS rosters(
    cid TEXT PRIMARY KEY, epoch INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS founded(
    cid TEXT PRIMARY KEY, pid TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS retained(
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions(
    client_id TEXT PRIMARY KEY, username TEXT NOT NULL, subscriptions TEXT NOT NULL,
    expiry INTEGER NOT NULL DEFAULT 4294967295, expires_at REAL);
CREATE TABLE IF NOT EXISTS queue(
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, props BLOB NOT NULL DEFAULT x'',
    expires_at REAL, sent INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(client_id, seq)) WITHOUT ROWID;
"""
_MIGRATE_1_TO_2 = (  # columns of schema 2; rows of schema 1 take the defaults
    "ALTER TABLE sessions ADD COLUMN expiry INTEGER NOT NULL DEFAULT 4294967295",
    "ALTER TABLE sessions ADD COLUMN expires_at REAL",
    "ALTER TABLE queue ADD COLUMN props BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE queue ADD COLUMN expires_at REAL",
    "ALTER TABLE queue ADD COLUMN sent INTEGER NOT NULL DEFAULT 0",
)
_GATEWAY_PREFIX = "gw-"
_GATEWAY_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def gateway_username(name: str) -> str:
    """``gw-<name>``: the username (and client id) of a gateway replica.

    Raises:
        ConfigError: ``name`` is not 1-40 characters of ``a-z0-9-``.
    """
    name = name.removeprefix(_GATEWAY_PREFIX)
    if not 1 <= len(name) <= 40 or not set(name) <= _GATEWAY_NAME_CHARS:
        raise ConfigError(f"gateway name {name[:50]!r}: use 1-40 characters of a-z, 0-9 and -")
    return _GATEWAY_PREFIX + name


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    role: Role
    hash: str

    def __repr__(self) -> str:  # the hash stays out of logs too
        return f"Account({self.username!r}, {self.role})"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A queued message as stored; ``sent`` is its packet id while in flight, else 0."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes = b""
    expires_at: float | None = None
    sent: int = 0


@dataclass(frozen=True, slots=True)
class StoredSession:
    username: str
    subscriptions: dict[str, int | list[int]]
    expiry: int
    expires_at: float | None


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating 0600 if new) and migrate the database.

    Raises:
        ConfigError: the file cannot be opened or is not a broker database.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            path.touch(mode=0o600)
        path.chmod(0o600)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            conn.close()
            raise ConfigError(f"{path} was written by a newer fieldchat (schema {version})")
        if version == 1:
            for statement in _MIGRATE_1_TO_2:
                conn.execute(statement)
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(f"cannot open broker database {path}: {exc}") from exc
    return conn


class Store:
    """Synchronous access for admin commands and the start-up load.

    Raises (every method):
        ConfigError: the database cannot be opened or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ConfigError(f"broker database {self.path}: {exc}") from exc

    # accounts -----------------------------------------------------------------

    def enroll(self, pid: str) -> str:
        """Issue (or replace) the credential of participant ``pid``; return it once.

        Raises:
            InvalidId: ``pid`` is not a participant id.
        """
        return self._issue(validate_id(pid, "pid"), "participant")

    def add_gateway(self, name: str) -> tuple[str, str]:
        """Issue (or replace) a gateway credential; return ``(username, credential)``.

        Raises:
            ConfigError: invalid name.
        """
        username = gateway_username(name)
        return username, self._issue(username, "gateway")

    def _issue(self, username: str, role: Role) -> str:
        credential = new_credential()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO accounts VALUES(?, ?, ?, ?)",
                (username, role, hash_credential(credential), int(time.time())),
            )
        return credential

    def revoke(self, username: str) -> None:
        """Delete an account, its session and queued messages.

        Raises:
            UnknownAccount: no such account.
        """
        with self._tx() as conn:
            if not conn.execute("DELETE FROM accounts WHERE username=?", (username,)).rowcount:
                raise UnknownAccount(f"no account {username[:60]!r}")
            conn.execute("DELETE FROM sessions WHERE client_id=?", (username,))
            conn.execute("DELETE FROM queue WHERE client_id=?", (username,))

    def accounts(self) -> dict[str, Account]:
        rows = self._conn.execute("SELECT username, role, hash FROM accounts").fetchall()
        return {u: Account(u, r, h) for u, r, h in rows}

    # membership ---------------------------------------------------------------

    def allow(self, pid: str, cid: str) -> None:
        """Admin override: ``pid`` is a member of ``cid`` whatever the roster says."""
        self._override(pid, cid, allow=True)

    def deny(self, pid: str, cid: str) -> None:
        """Admin override: ``pid`` is not a member of ``cid`` whatever the roster says."""
        self._override(pid, cid, allow=False)

    def clear_override(self, pid: str, cid: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM overrides WHERE pid=? AND cid=?", (pid, cid))

    def _override(self, pid: str, cid: str, *, allow: bool) -> None:
        validate_id(pid, "pid")
        validate_id(cid, "cid")
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO overrides VALUES(?, ?, ?)", (pid, cid, int(allow)))

    def overrides(self) -> list[tuple[str, str, bool]]:
        rows = self._conn.execute("SELECT pid, cid, allow FROM overrides").fetchall()
        return [(p, c, bool(a)) for p, c, a in rows]

    def record_roster(self, roster: Roster) -> None:
        """Remember the current roster of a conversation (membership source)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rosters VALUES(?, ?, ?)",
                (roster.cid, roster.epoch, roster.to_bytes()),
            )

    def record_founded(self, cid: str, pid: str, at: float) -> None:
        """Remember that ``pid`` founded ``cid`` at ``at`` (the founding quota)."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO founded VALUES(?, ?, ?)", (cid, pid, at))

    def founded(self, since: float) -> list[tuple[str, float]]:
        """``(founder pid, when)`` of the conversations founded after ``since``."""
        rows = self._conn.execute("SELECT pid, at FROM founded WHERE at > ?", (since,))
        return [(pid, float(at)) for pid, at in rows]

    def rosters(self) -> dict[str, Roster]:
        out = {}
        for cid, data in self._conn.execute("SELECT cid, data FROM rosters"):
            try:
                out[cid] = Roster.from_bytes(bytes(data))
            except FieldchatError:
                log.warning("stored roster of %s no longer decodes; ignored", cid)
        return out

    # broker state ---------------------------------------------------------------

    def retained(self) -> dict[str, tuple[bytes, int]]:
        rows = self._conn.execute("SELECT topic, payload, qos FROM retained").fetchall()
        return {t: (bytes(p), q) for t, p, q in rows}

    def sessions(self) -> dict[str, StoredSession]:
        rows = self._conn.execute(
            "SELECT client_id, username, subscriptions, expiry, expires_at FROM sessions"
        )
        return {c: StoredSession(u, json.loads(s), e, at) for c, u, s, e, at in rows}

    def queued(self) -> dict[str, list[StoredMessage]]:
        out: dict[str, list[StoredMessage]] = {}
        rows = self._conn.execute(
            "SELECT client_id, seq, topic, payload, qos, retain, props, expires_at, sent"
            " FROM queue ORDER BY client_id, seq"
        )
        for client_id, seq, topic, payload, qos, retain, props, expires_at, sent in rows:
            out.setdefault(client_id, []).append(
                StoredMessage(
                    seq, topic, bytes(payload), qos, bool(retain), bytes(props), expires_at, sent
                )
            )
        return out

    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite ``PRAGMA data_version``)."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
