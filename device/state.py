"""A device's on-disk state: one SQLite file, mode 0600.

It holds the engine's key-store records (the same ``records`` table as
:class:`device.keystore.SqliteKeyStore`, so it *is* the engine's
:class:`~device.keystore.KeyStore`) next to the client's tables:

    outbox    publications not yet acknowledged by the broker, in send order
    sent      our own text messages (history; payload kept until every member receipted)
    received  messages of others, unique on the dedupe key (cid, epoch, sender, chain, step)
    receipts  delivered/read ranges other members sent us for our messages
    kept      our own receipts and controls, kept a while to publish again when a
              member asks for their steps (a MISSING receipt, PROTOCOL.md §4.1)
    held      envelopes whose grant or roster has not arrived yet (``until`` NULL), or
              that arrived ahead of a missing step and wait for it until ``until``
    gaps      missing step ranges per sender chain (to ask the gateway's history for)
    meta      small settings (saved broker URL and credential, detected protocol)

Atomicity is what makes delivery exactly-once on screen: the client opens a
transaction, lets the engine open envelopes inside it (the engine's own writes join
the transaction, see :meth:`DeviceState.save`), inserts the received rows, and
commits before acknowledging anything to the broker. Sending is symmetric: the
chain reservation and the outbox row commit together, so an envelope exists on disk
only with its step reserved.

Two levels of durability (the WAL makes both atomic):

    transaction()               one fsync at COMMIT: survives a power cut.
    transaction(durable=False)  no fsync: survives a crash of the process (the WAL
                                frames are in the kernel), not a power cut, until the
                                next :meth:`DeviceState.sync` or durable commit.

Whatever must not be lost in a power cut once the outside world has seen it is
synced (one fsync of the WAL, covering every earlier frame) before it can leave:

* a received batch is committed without an fsync and shown, and synced before its
  PUBACKs leave (a power cut in between: the broker delivers it again);
* outbox rows of a transaction opened with ``sync_outbox`` (grants and rosters the
  worker writes, sends in power-safe mode) are synced before they are published;
* a sending chain's reservation (records under ``SEND_CHAIN_PREFIX``) is synced
  before anything of its transaction is published, whatever ``sync_outbox`` says:
  a reservation lost after its steps were used would mean keys and nonces used
  twice (PROTOCOL.md §6.3). It is one record write per ``RESERVE_STEPS`` sends.

So ordinary outbox rows (:meth:`device.client.Device.send` by default) may be
published before their fsync: a power cut can then lose a message the device has
already sent (receivers have it; the sender's history does not), never reuse a step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fieldchat.device.keystore import SEND_CHAIN_PREFIX, create_private_file, write_records
from fieldchat.schemas.errors import ConfigError, KeyStoreError

__all__ = [
    "ARCHIVED",
    "MAX_HELD",
    "MAX_KEPT",
    "NOT_ARCHIVED",
    "REFUSED",
    "DeviceState",
    "Gap",
    "OutboxRow",
    "OwnEnvelope",
    "ReceivedRow",
    "SentRow",
]

MAX_HELD = 10_000  # envelopes held for a missing grant; past it the oldest are dropped (logged)
MAX_KEPT = 10_000  # own receipts and controls kept for gap requests; past it the oldest go
CHECKPOINT_INTERVAL_S = 0.2  # background WAL checkpoints (see checkpoint_in_background)
# With background checkpoints, the committing thread checkpoints only past this many WAL
# pages (SQLite's default is 1,000): a writer that never pauses still bounds the WAL.
FALLBACK_AUTOCHECKPOINT_PAGES = 16_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    retain INTEGER NOT NULL, cid TEXT, what TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sent (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cid TEXT NOT NULL, epoch INTEGER NOT NULL,
    sender_index INTEGER NOT NULL, chain INTEGER NOT NULL, step INTEGER NOT NULL,
    text TEXT NOT NULL, sent_at REAL NOT NULL,
    topic TEXT NOT NULL, payload BLOB, outbox_seq INTEGER NOT NULL, published_at REAL,
    UNIQUE (cid, epoch, chain, step));
CREATE INDEX IF NOT EXISTS sent_published ON sent (published_at) WHERE payload IS NOT NULL;
CREATE INDEX IF NOT EXISTS sent_outbox ON sent (outbox_seq);
CREATE TABLE IF NOT EXISTS kept (
    cid TEXT NOT NULL, epoch INTEGER NOT NULL, sender_index INTEGER NOT NULL,
    chain INTEGER NOT NULL, step INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    outbox_seq INTEGER NOT NULL, published_at REAL, archived INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cid, epoch, chain, step));
CREATE INDEX IF NOT EXISTS kept_outbox ON kept (outbox_seq);
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cid TEXT NOT NULL, epoch INTEGER NOT NULL,
    sender_index INTEGER NOT NULL, chain INTEGER NOT NULL, step INTEGER NOT NULL,
    sender TEXT NOT NULL, kind INTEGER NOT NULL, sent_at INTEGER, text TEXT,
    received_at REAL NOT NULL, read INTEGER NOT NULL DEFAULT 0,
    UNIQUE (cid, epoch, sender_index, chain, step));
CREATE TABLE IF NOT EXISTS receipts (
    cid TEXT NOT NULL, pid TEXT NOT NULL, type INTEGER NOT NULL, epoch INTEGER NOT NULL,
    chain INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS receipts_chain ON receipts (cid, epoch, chain);
CREATE TABLE IF NOT EXISTS held (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cid TEXT NOT NULL, payload BLOB NOT NULL,
    held_at REAL NOT NULL, until REAL);
CREATE TABLE IF NOT EXISTS gaps (
    cid TEXT NOT NULL, epoch INTEGER NOT NULL, sender_index INTEGER NOT NULL,
    chain INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    sender TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (cid, epoch, sender_index, chain, first));
"""


# Own envelopes the archive has not confirmed yet (``archived``: 0 not yet, 1 archived,
# -1 refused for good), oldest first: what an archive check names.
_UNARCHIVED_INDEXES = """
CREATE INDEX IF NOT EXISTS sent_unarchived ON sent (published_at)
    WHERE archived = 0 AND payload IS NOT NULL;
CREATE INDEX IF NOT EXISTS kept_unarchived ON kept (published_at) WHERE archived = 0;
"""
ARCHIVED, NOT_ARCHIVED, REFUSED = 1, 0, -1
_OWN_TABLES = ("sent", "kept")


@dataclass(frozen=True, slots=True)
class OwnEnvelope:
    """An own envelope to reconcile with the archive (``sent`` or ``kept``)."""

    cid: str
    epoch: int
    sender_index: int
    chain: int
    step: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    cid: str | None
    what: str
    created_at: float


@dataclass(frozen=True, slots=True)
class SentRow:
    id: int
    cid: str
    epoch: int
    chain: int
    step: int
    text: str
    sent_at: float
    published_at: float | None


@dataclass(frozen=True, slots=True)
class ReceivedRow:
    """One stored message of another member (``text`` is ``None`` for receipts/controls)."""

    id: int
    cid: str
    epoch: int
    sender_index: int
    chain: int
    step: int
    sender: str
    kind: int
    sent_at: int | None
    text: str | None
    received_at: float
    read: bool


@dataclass(frozen=True, slots=True)
class Gap:
    """Steps ``first..last`` of one sender chain that have not arrived (yet)."""

    cid: str
    epoch: int
    sender_index: int
    chain: int
    first: int
    last: int
    sender: str
    since: float


class DeviceState:
    """The state file. Thread-safe; one connection guarded by a re-entrant lock.

    Raises:
        KeyStoreError: from the constructor when the file cannot be opened or is
            readable by others; from any method when SQLite fails.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        create_private_file(self.path, "state file")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(sent)")}
            if "archived" not in columns:  # a state file from before archive checks
                self._db.execute("ALTER TABLE sent ADD COLUMN archived INTEGER NOT NULL DEFAULT 0")
            self._db.executescript(_UNARCHIVED_INDEXES)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open state file {self.path}: {exc}") from exc
        except OSError as exc:
            raise KeyStoreError(f"cannot open state file {self.path}: {exc.strerror}") from exc
        self._lock = threading.RLock()
        self._lockfile: IO[str] | None = None
        self._depth = 0
        self._undo: list[Callable[[], None]] = []  # see on_rollback
        self._durable = True  # of the open transaction
        self._written = 0  # commits without an fsync so far
        self._synced = 0  # ... of which this many are known durable
        self._txn_outbox = False  # the open transaction added an outbox row
        self._txn_chain = False  # ... or wrote a sending chain's reservation
        self._outbox_gen = 0  # the last commit without fsync whose outbox rows wait for one
        self._chain_gen = 0  # the last commit without fsync that wrote a reservation
        self._sync_lock = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self.commits = 0
        self.fsyncs = 0
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                side.chmod(0o600)

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def transaction(
        self, *, durable: bool = True, sync_outbox: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One atomic unit; nested calls join the outer transaction (and its durability).

        ``durable``: fsync at COMMIT; without it the commit survives a process crash
        and becomes power-safe at the next :meth:`sync` or durable commit.
        ``sync_outbox`` (without ``durable``): its outbox rows are synced before they
        are published (:attr:`outbox_unsynced`); without it they may leave at once,
        unless the transaction wrote a reservation (see the module docstring).

        Raises:
            KeyStoreError: SQLite failed (the transaction is rolled back).
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            try:
                if durable != self._durable:
                    # Takes effect for this connection's next COMMIT (SQLite, PRAGMA
                    # synchronous: in WAL mode NORMAL syncs only at checkpoints).
                    self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise KeyStoreError(f"state file write failed: {exc}") from exc
            self._depth = 1
            self._txn_outbox = self._txn_chain = False
            self._undo = []
            try:
                yield self._db
            except sqlite3.Error as exc:
                self._rollback()
                raise KeyStoreError(f"state file write failed: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            self._depth = 0
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise KeyStoreError(f"state file write failed: {exc}") from exc
            self._undo = []
            self.commits += 1
            self._written += 1
            if durable:  # the fsync of the WAL covers every earlier frame too
                self._synced = self._written
                return
            if self._txn_chain:
                self._chain_gen = self._written
            if self._txn_outbox and (sync_outbox or self._txn_chain):
                self._outbox_gen = self._written

    def _rollback(self) -> None:
        """Roll the open transaction back, then undo what was adopted in memory with it
        (newest first: the engine's reservations, see :meth:`on_rollback`)."""
        self._depth = 0
        undo, self._undo = self._undo, []
        try:
            # SQLite may have rolled back by itself (after SQLITE_FULL or SQLITE_IOERR).
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        finally:
            for step in reversed(undo):
                step()

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` if the open transaction rolls back (the KeyStore protocol).

        Outside a transaction the last :meth:`save` has committed: nothing to undo.
        """
        if self._depth:
            self._undo.append(undo)

    @property
    def unsynced(self) -> bool:
        """Whether a commit since the last fsync is not power-safe yet."""
        return self._synced != self._written

    @property
    def outbox_unsynced(self) -> bool:
        """Whether outbox rows that must be synced before publishing wait for an fsync."""
        return self._synced < self._outbox_gen

    @property
    def generation(self) -> int:
        """Commits so far (without an fsync): compare with :attr:`synced_generation`."""
        return self._written

    @property
    def synced_generation(self) -> int:
        """Commits so far known durable: every one up to the last :meth:`sync`."""
        return self._synced

    @property
    def reserving(self) -> bool:
        """Whether the open transaction wrote a sending chain's reservation (read it
        inside the transaction)."""
        return self._txn_chain

    @property
    def reservation_unsynced(self) -> bool:
        """Whether a sending chain's reservation was committed without an fsync."""
        return self._synced < self._chain_gen

    def sync(self) -> None:
        """Make every commit so far durable: one fsync of the WAL, if anything is pending.

        The fsync runs outside the connection lock, so senders and the worker keep
        committing meanwhile; concurrent callers share one fsync where they can.

        Raises:
            KeyStoreError: the fsync failed.
        """
        with self._sync_lock:
            with self._lock:
                target = self._written
                if self._synced >= target:
                    return
            try:
                # Opened per call: SQLite may replace the WAL file between calls (a new
                # inode when the last connection of another process closes it).
                fd = os.open(f"{self.path}-wal", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise KeyStoreError(f"state file sync failed: {exc.strerror}") from exc
            with self._lock:
                self.fsyncs += 1
                self._synced = max(self._synced, target)

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        try:
            with self._lock:
                return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise KeyStoreError(f"state file read failed: {exc}") from exc

    # -- the engine's KeyStore protocol -----------------------------------------------

    def load(self, key: str) -> bytes | None:
        rows = self._read("SELECT value FROM records WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        rows = self._read(
            "SELECT key, value FROM records WHERE key >= ? AND key < ?",
            (prefix, prefix + "\U0010ffff"),
        )
        return {str(k): bytes(v) for k, v in rows}

    def save(self, items: Mapping[str, bytes | None]) -> None:
        """Write engine records; joins the caller's transaction when one is open."""
        try:
            with self.transaction() as db:
                if any(key.startswith(SEND_CHAIN_PREFIX) for key in items):
                    self._txn_chain = True
                write_records(db, "records", items)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"state file write failed: {exc}") from exc

    # -- meta -------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, values: Mapping[str, str | None]) -> None:
        with self.transaction() as db:
            write_records(db, "meta", values)

    # -- outbox and sent (callers hold a transaction for writes) -----------------------

    def add_outbox(
        self,
        db: sqlite3.Connection,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        cid: str | None = None,
        what: str = "msg",
    ) -> int:
        self._txn_outbox = True
        cur = db.execute(
            "INSERT INTO outbox (topic, payload, retain, cid, what, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, int(retain), cid, what, time.time()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @staticmethod
    def add_sent(
        db: sqlite3.Connection,
        cid: str,
        epoch: int,
        sender_index: int,
        chain: int,
        step: int,
        text: str,
        topic: str,
        payload: bytes,
        outbox_seq: int,
    ) -> int:
        cur = db.execute(
            "INSERT INTO sent (cid, epoch, sender_index, chain, step, text, sent_at, topic,"
            " payload, outbox_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, epoch, sender_index, chain, step, text, time.time(), topic, payload, outbox_seq),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @staticmethod
    def add_kept(
        db: sqlite3.Connection,
        cid: str,
        header: tuple[int, int, int, int],
        topic: str,
        payload: bytes,
        outbox_seq: int,
    ) -> None:
        """Keep an own receipt or control (``header``: epoch, sender index, chain,
        step) for gap requests; texts are kept in ``sent``."""
        epoch, sender_index, chain, step = header
        db.execute(
            "INSERT OR REPLACE INTO kept (cid, epoch, sender_index, chain, step, topic, payload,"
            " outbox_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, epoch, sender_index, chain, step, topic, payload, outbox_seq),
        )

    def own_envelopes(
        self, cid: str, chain: tuple[int, int, int], first: int, last: int, limit: int
    ) -> list[tuple[int, str, bytes]]:
        """Own envelopes of ``chain`` (epoch, sender index, chain) with a step in
        ``first..last`` that were published and are still kept (texts and the rest):
        ``(step, topic, payload)``, lowest step first, at most ``limit``."""
        epoch, sender_index, number = chain
        where = (
            "WHERE cid = ? AND epoch = ? AND sender_index = ? AND chain = ? AND step >= ? "
            "AND step <= ? AND payload IS NOT NULL AND published_at IS NOT NULL"
        )
        args = (cid, epoch, sender_index, number, first, last)
        rows = self._read(
            f"SELECT step, topic, payload FROM sent {where} UNION ALL "  # noqa: S608 - constants
            f"SELECT step, topic, payload FROM kept {where} ORDER BY step LIMIT ?",
            (*args, *args, limit),
        )
        return [(int(step), str(topic), bytes(payload)) for step, topic, payload in rows]

    @staticmethod
    def prune_kept(
        db: sqlite3.Connection, published_before: float, *, keep_unarchived: bool = False
    ) -> int:
        """Forget kept receipts and controls published before ``published_before`` (with
        ``keep_unarchived``, only those the archive confirmed), and the oldest beyond
        MAX_KEPT whatever the archive says; how many went."""
        gone = db.execute(
            "DELETE FROM kept WHERE published_at < ? AND (archived != 0 OR ? = 0)",
            (published_before, int(keep_unarchived)),
        ).rowcount
        (count,) = db.execute("SELECT COUNT(*) FROM kept").fetchone()
        excess = int(count) - MAX_KEPT
        if excess > 0:
            db.execute(
                "DELETE FROM kept WHERE rowid IN (SELECT rowid FROM kept ORDER BY outbox_seq "
                "LIMIT ?)",
                (excess,),
            )
            gone += excess
        return int(gone)

    def outbox_from(self, seq: int, limit: int) -> list[OutboxRow]:
        """Rows with ``seq`` at least ``seq``, oldest first."""
        rows = self._read(
            "SELECT seq, topic, payload, retain, cid, what, created_at FROM outbox "
            "WHERE seq >= ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            OutboxRow(
                int(s), str(t), bytes(p), bool(r), None if c is None else str(c), str(w), float(at)
            )
            for s, t, p, r, c, w, at in rows
        ]

    def outbox_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM outbox")[0][0])

    @staticmethod
    def acknowledged(db: sqlite3.Connection, seqs: Sequence[int], at: float) -> None:
        """The broker acknowledged these outbox rows: drop them, date the sent rows."""
        db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
        for table in ("sent", "kept"):
            db.executemany(
                f"UPDATE {table} SET published_at = ? "  # noqa: S608 - a constant
                "WHERE outbox_seq = ? AND published_at IS NULL",
                [(at, s) for s in seqs],
            )

    @staticmethod
    def refused(db: sqlite3.Connection, seqs: Sequence[int]) -> list[OutboxRow]:
        """The broker refused these outbox rows for good (MQTT 5 negative PUBACK): they
        leave the outbox and are never published again. An own text stays in ``sent``
        (the local history) without its ciphertext and without a publication time
        (neither resent, nor served to a gap request, nor given to the archive); an
        own receipt or control leaves ``kept``. Returns the rows as they were."""
        marks = ",".join("?" * len(seqs))
        rows = [
            OutboxRow(
                int(s), str(t), bytes(p), bool(r), None if c is None else str(c), str(w), float(at)
            )
            for s, t, p, r, c, w, at in db.execute(
                "SELECT seq, topic, payload, retain, cid, what, created_at FROM outbox "  # noqa: S608
                f"WHERE seq IN ({marks}) ORDER BY seq",  # only placeholders go in
                list(seqs),
            )
        ]
        args = [(s,) for s in seqs]
        db.executemany("DELETE FROM outbox WHERE seq = ?", args)
        db.executemany("DELETE FROM kept WHERE outbox_seq = ?", args)
        db.executemany(
            "UPDATE sent SET payload = NULL, archived = ? WHERE outbox_seq = ?",
            [(REFUSED, s) for s in seqs],
        )
        return rows

    def sent(self, cid: str | None = None, *, limit: int = 1_000_000) -> list[SentRow]:
        rows = self._read(
            "SELECT id, cid, epoch, chain, step, text, sent_at, published_at FROM sent "
            "WHERE (? IS NULL OR cid = ?) ORDER BY id LIMIT ?",
            (cid, cid, limit),
        )
        return [SentRow(*row) for row in rows]

    def unconfirmed(
        self, before: float, after: float, limit: int
    ) -> list[tuple[int, str, str, bytes, int, int, int]]:
        """Published own messages in ``(after, before)`` still keeping their payload:
        ``(id, cid, topic, payload, epoch, chain, step)``, oldest first."""
        return self._read(
            "SELECT id, cid, topic, payload, epoch, chain, step FROM sent "
            "WHERE payload IS NOT NULL AND published_at IS NOT NULL "
            "AND published_at < ? AND published_at > ? ORDER BY id LIMIT ?",
            (before, after, limit),
        )

    def was_sender(self, cid: str, epoch: int, sender_index: int) -> bool:
        """Whether we sent messages as ``sender_index`` in ``epoch`` of ``cid``."""
        return bool(
            self._read(
                "SELECT 1 FROM sent WHERE cid = ? AND epoch = ? AND sender_index = ? LIMIT 1",
                (cid, epoch, sender_index),
            )
        )

    def unreceipted(self, cid: str, epoch: int, pid: str, limit: int) -> list[tuple[str, bytes]]:
        """Own messages of ``cid``/``epoch`` still kept that ``pid`` has not receipted."""
        rows = self._read(
            "SELECT s.topic, s.payload FROM sent s WHERE s.cid = ? AND s.epoch = ? "
            "AND s.payload IS NOT NULL AND NOT EXISTS (SELECT 1 FROM receipts r WHERE "
            "r.cid = s.cid AND r.pid = ? AND r.epoch = s.epoch AND r.chain = s.chain "
            "AND r.first <= s.step AND r.last >= s.step) ORDER BY s.id LIMIT ?",
            (cid, epoch, pid, limit),
        )
        return [(str(t), bytes(p)) for t, p in rows]

    def receipted_by(self, cid: str, epoch: int, chain: int, step: int) -> set[str]:
        rows = self._read(
            "SELECT DISTINCT pid FROM receipts WHERE cid = ? AND epoch = ? AND chain = ? "
            "AND first <= ? AND last >= ?",
            (cid, epoch, chain, step, step),
        )
        return {str(r[0]) for r in rows}

    @staticmethod
    def forget_payloads(
        db: sqlite3.Connection, ids: Sequence[int], *, keep_unarchived: bool = False
    ) -> None:
        """Drop the kept ciphertext of messages that need no resending any more (with
        ``keep_unarchived``, not of those the archive has not confirmed yet)."""
        db.executemany(
            "UPDATE sent SET payload = NULL WHERE id = ? AND (archived != 0 OR ? = 0)",
            [(i, int(keep_unarchived)) for i in ids],
        )

    @staticmethod
    def forget_old_payloads(
        db: sqlite3.Connection, published_before: float, *, keep_unarchived: bool = False
    ) -> int:
        """Drop the ciphertext of own texts published before ``published_before`` (no
        longer resent after a reconnect: ``resend_window_s``); with ``keep_unarchived``,
        not of those the archive has not confirmed. How many."""
        return int(
            db.execute(
                "UPDATE sent SET payload = NULL WHERE payload IS NOT NULL "
                "AND published_at < ? AND (archived != 0 OR ? = 0)",
                (published_before, int(keep_unarchived)),
            ).rowcount
        )

    def unarchived(self, published_before: float, limit: int) -> list[OwnEnvelope]:
        """Own envelopes (texts, receipts, controls) published before
        ``published_before`` that the archive has not confirmed, oldest first."""
        rows = self._read(
            "SELECT * FROM ("
            "SELECT published_at, cid, epoch, sender_index, chain, step, payload FROM sent "
            "WHERE archived = 0 AND payload IS NOT NULL AND published_at < ? UNION ALL "
            "SELECT published_at, cid, epoch, sender_index, chain, step, payload FROM kept "
            "WHERE archived = 0 AND published_at < ?) ORDER BY published_at LIMIT ?",
            (published_before, published_before, limit),
        )
        return [OwnEnvelope(str(c), e, i, ch, st, bytes(p)) for _, c, e, i, ch, st, p in rows]

    def unarchived_count(self) -> int:
        """Own envelopes published and kept that the archive has not confirmed."""
        return sum(
            int(
                self._read(
                    f"SELECT COUNT(*) FROM {table} WHERE archived = 0 "  # noqa: S608 - constant
                    "AND payload IS NOT NULL AND published_at IS NOT NULL"
                )[0][0]
            )
            for table in _OWN_TABLES
        )

    @staticmethod
    def mark_archived(
        db: sqlite3.Connection, keys: Sequence[tuple[str, int, int, int]], value: int = ARCHIVED
    ) -> None:
        """The archive confirmed (or, ``REFUSED``, refused for good) these own envelopes:
        ``(cid, epoch, chain, step)``."""
        for table in _OWN_TABLES:
            db.executemany(
                f"UPDATE {table} SET archived = ? "  # noqa: S608 - a constant
                "WHERE cid = ? AND epoch = ? AND chain = ? AND step = ?",
                [(value, *key) for key in keys],
            )

    @staticmethod
    def give_up_archive(db: sqlite3.Connection, cid: str) -> None:
        """No longer keep own envelopes of ``cid`` for the archive (we left it)."""
        for table in _OWN_TABLES:
            db.execute(
                f"UPDATE {table} SET archived = ? WHERE cid = ? AND archived = ?",  # noqa: S608
                (REFUSED, cid, NOT_ARCHIVED),
            )

    def own_high(self, cid: str) -> dict[tuple[int, int, int], int]:
        """The highest step of each own sending chain of ``cid`` we hold a row of:
        ``(epoch, sender index, chain) -> step`` (what a tail need not return)."""
        rows = self._read(
            "SELECT epoch, sender_index, chain, MAX(step) FROM ("
            "SELECT epoch, sender_index, chain, step FROM sent WHERE cid = ? UNION ALL "
            "SELECT epoch, sender_index, chain, step FROM kept WHERE cid = ?) "
            "GROUP BY epoch, sender_index, chain",
            (cid, cid),
        )
        return {(int(e), int(i), int(c)): int(m) for e, i, c, m in rows}

    @staticmethod
    def add_receipt(
        db: sqlite3.Connection,
        cid: str,
        pid: str,
        rtype: int,
        epoch: int,
        chain: int,
        first: int,
        last: int,
    ) -> None:
        db.execute(
            "INSERT INTO receipts (cid, pid, type, epoch, chain, first, last, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, pid, rtype, epoch, chain, first, last, time.time()),
        )

    # -- received ---------------------------------------------------------------------

    @staticmethod
    def add_received(
        db: sqlite3.Connection,
        cid: str,
        epoch: int,
        sender_index: int,
        chain: int,
        step: int,
        sender: str,
        kind: int,
        sent_at: int | None,
        text: str | None,
    ) -> int | None:
        """Insert a received message; its id, or ``None`` when it is a duplicate."""
        cur = db.execute(
            "INSERT OR IGNORE INTO received (cid, epoch, sender_index, chain, step, sender, kind,"
            " sent_at, text, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, epoch, sender_index, chain, step, sender, kind, sent_at, text, time.time()),
        )
        return cur.lastrowid if cur.rowcount == 1 else None

    def received(
        self,
        cid: str | None = None,
        *,
        after_id: int = 0,
        limit: int = 1_000_000,
    ) -> list[ReceivedRow]:
        rows = self._read(
            "SELECT id, cid, epoch, sender_index, chain, step, sender, kind, sent_at, text,"
            " received_at, read FROM received WHERE (? IS NULL OR cid = ?) AND id > ?"
            " AND text IS NOT NULL ORDER BY id LIMIT ?",
            (cid, cid, after_id, limit),
        )
        return [
            ReceivedRow(
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], bool(r[11])
            )
            for r in rows
        ]

    def high_steps(self) -> dict[tuple[str, int, int, int], int]:
        """Highest received step per (cid, epoch, sender_index, chain)."""
        rows = self._read(
            "SELECT cid, epoch, sender_index, chain, MAX(step) FROM received "
            "GROUP BY cid, epoch, sender_index, chain"
        )
        return {(str(c), int(e), int(s), int(ch)): int(m) for c, e, s, ch, m in rows}

    @staticmethod
    def mark_read(db: sqlite3.Connection, cid: str) -> list[tuple[int, int, int, int]]:
        """Mark every unread text of ``cid`` read: ``(epoch, sender_index, chain, step)``."""
        rows = db.execute(
            "SELECT epoch, sender_index, chain, step FROM received "
            "WHERE cid = ? AND read = 0 AND text IS NOT NULL",
            (cid,),
        ).fetchall()
        db.execute("UPDATE received SET read = 1 WHERE cid = ? AND read = 0", (cid,))
        return [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]

    # -- held envelopes ---------------------------------------------------------------

    @staticmethod
    def hold(
        db: sqlite3.Connection, cid: str, payload: bytes, until: float | None = None
    ) -> tuple[int, int]:
        """Keep an envelope for later: its row id, and how many of the oldest rows
        were dropped to stay within MAX_HELD (the caller logs them)."""
        cur = db.execute(
            "INSERT INTO held (cid, payload, held_at, until) VALUES (?, ?, ?, ?)",
            (cid, payload, time.time(), until),
        )
        (count,) = db.execute("SELECT COUNT(*) FROM held").fetchone()
        excess = int(count) - MAX_HELD
        if excess > 0:
            db.execute(
                "DELETE FROM held WHERE id IN (SELECT id FROM held ORDER BY id LIMIT ?)",
                (excess,),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid, max(0, excess)

    def held(self, *, reordering: bool = False) -> list[tuple[int, str, bytes, float | None]]:
        """Held envelopes: waiting for a key, or (``reordering``) for a missing step."""
        rows = self._read(
            "SELECT id, cid, payload, until FROM held WHERE (until IS NULL) = ? ORDER BY id",
            (0 if reordering else 1,),
        )
        return [(int(i), str(c), bytes(p), u) for i, c, p, u in rows]

    def held_payload(self, row: int) -> bytes | None:
        rows = self._read("SELECT payload FROM held WHERE id = ?", (row,))
        return bytes(rows[0][0]) if rows else None

    @staticmethod
    def unhold(db: sqlite3.Connection, ids: Sequence[int]) -> None:
        db.executemany("DELETE FROM held WHERE id = ?", [(i,) for i in ids])

    # -- gaps -------------------------------------------------------------------------

    @staticmethod
    def add_gap(db: sqlite3.Connection, gap: Gap) -> None:
        db.execute(
            "INSERT OR REPLACE INTO gaps (cid, epoch, sender_index, chain, first, last, sender,"
            " since) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                gap.cid,
                gap.epoch,
                gap.sender_index,
                gap.chain,
                gap.first,
                gap.last,
                gap.sender,
                gap.since,
            ),
        )

    @staticmethod
    def fill_gap(
        db: sqlite3.Connection,
        cid: str,
        epoch: int,
        sender_index: int,
        chain: int,
        step: int,
    ) -> bool:
        """Remove ``step`` from the gap containing it (splitting it); whether one did."""
        row = db.execute(
            "SELECT first, last, sender, since FROM gaps WHERE cid = ? AND epoch = ? AND "
            "sender_index = ? AND chain = ? AND first <= ? AND last >= ?",
            (cid, epoch, sender_index, chain, step, step),
        ).fetchone()
        if row is None:
            return False
        first, last, sender, since = row
        db.execute(
            "DELETE FROM gaps WHERE cid = ? AND epoch = ? AND sender_index = ? AND chain = ? "
            "AND first = ?",
            (cid, epoch, sender_index, chain, first),
        )
        for lo, hi in ((first, step - 1), (step + 1, last)):
            if lo <= hi:
                DeviceState.add_gap(db, Gap(cid, epoch, sender_index, chain, lo, hi, sender, since))
        return True

    def gaps(self, cid: str | None = None) -> list[Gap]:
        rows = self._read(
            "SELECT cid, epoch, sender_index, chain, first, last, sender, since FROM gaps "
            "WHERE (? IS NULL OR cid = ?) ORDER BY cid, epoch, sender_index, chain, first",
            (cid, cid),
        )
        return [Gap(*row) for row in rows]

    @staticmethod
    def drop_gap(db: sqlite3.Connection, gap: Gap) -> None:
        db.execute(
            "DELETE FROM gaps WHERE cid = ? AND epoch = ? AND sender_index = ? AND chain = ? "
            "AND first = ?",
            (gap.cid, gap.epoch, gap.sender_index, gap.chain, gap.first),
        )

    def lock(self) -> None:
        """Claim the state file for this process (one connection per identity).

        Raises:
            ConfigError: another process holds it.
        """
        if self._lockfile is not None:
            return
        handle = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"state file {self.path} is in use by another fieldchat process"
            ) from None
        self._lockfile = handle

    def checkpoint_in_background(self, interval: float = CHECKPOINT_INTERVAL_S) -> None:
        """Copy the WAL into the database from a thread of its own, every ``interval``.

        SQLite otherwise checkpoints in whichever thread commits the 1,000th WAL page:
        a ``send`` or a received batch then waits for 4 MB of copying and two fsyncs
        (up to 17 ms here, every ~160 sends). A PASSIVE checkpoint on a second connection
        runs beside the writers; it copies committed pages only, so what is durable
        does not change (it fsyncs the WAL first: if anything, more is).
        """
        if self._checkpointer is not None:
            return
        with self._lock:
            self._db.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_AUTOCHECKPOINT_PAGES}")
        self._checkpointer = threading.Thread(
            target=self._checkpoints, args=(interval,), name="fieldchat-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoints(self, interval: float) -> None:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error:
            return  # the committing threads' fallback checkpoints still bound the WAL
        try:
            while not self._checkpoint_stop.wait(interval):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    continue  # busy or I/O: the next round (or the fallback) catches up
        finally:
            db.close()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            self._checkpointer.join(10)
            self._checkpointer = None
        with self._lock:
            self._db.close()
            if self._lockfile is not None:
                self._lockfile.close()
                self._lockfile = None
