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
    sends_once  idempotency keys of sends (:mod:`fieldchat.device.idempotency`)

Atomicity is what makes delivery exactly-once on screen: the client opens a
transaction, lets the engine open envelopes inside it (the engine's own writes join
the transaction, see :meth:`DeviceState.save`), inserts the received rows, and
commits before acknowledging anything to the broker. Sending is symmetric: the
chain reservation and the outbox row commit together, so an envelope exists on disk
only with its step reserved.

The transactions, their durability (what is fsynced before it may leave) and the
background checkpoints are :class:`~fieldchat.device.statefile.StateFile`'s.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence

from fieldchat.device.idempotency import SCHEMA as SENDS_ONCE_SCHEMA
from fieldchat.device.keystore import SEND_CHAIN_PREFIX, write_records
from fieldchat.device.rows import (
    ARCHIVED,
    NOT_ARCHIVED,
    REFUSED,
    Gap,
    HeldRow,
    OutboxKind,
    OutboxRow,
    OwnEnvelope,
    ReceivedRow,
    SentRow,
    Trust,
    UnconfirmedRow,
)
from fieldchat.device.statefile import StateFile
from fieldchat.device.transaction import MAX_HELD, MAX_KEPT, OWN_TABLES, StateTransaction
from fieldchat.schemas.errors import KeyStoreError

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
    "StateTransaction",
]

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
    trust INTEGER NOT NULL DEFAULT 0,
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
# -1 refused for good, device.rows), oldest first: what an archive check names.
_UNARCHIVED_INDEXES = """
CREATE INDEX IF NOT EXISTS sent_unarchived ON sent (published_at)
    WHERE archived = 0 AND payload IS NOT NULL;
CREATE INDEX IF NOT EXISTS kept_unarchived ON kept (published_at) WHERE archived = 0;
"""


def _create_tables(db: sqlite3.Connection) -> None:
    db.executescript(_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(sent)")}
    if "archived" not in columns:  # a state file from before archive checks
        db.execute("ALTER TABLE sent ADD COLUMN archived INTEGER NOT NULL DEFAULT 0")
    columns = {row[1] for row in db.execute("PRAGMA table_info(received)")}
    if "trust" not in columns:  # a state file from before delayed authentication
        db.execute("ALTER TABLE received ADD COLUMN trust INTEGER NOT NULL DEFAULT 0")
    db.executescript(_UNARCHIVED_INDEXES)
    db.executescript(SENDS_ONCE_SCHEMA)


class DeviceState(StateFile):
    """The state file's tables: the engine's records, meta, and the client's rows
    (written through :class:`StateTransaction`). Thread-safe.

    Raises:
        KeyStoreError: from the constructor when the file cannot be opened or is
            readable by others; from any method when SQLite fails.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(path, _create_tables, clock=clock)

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
            with self.transaction():
                if any(key.startswith(SEND_CHAIN_PREFIX) for key in items):
                    self._reservation_written()
                write_records(self._db, "records", items)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"state file write failed: {exc}") from exc

    # -- meta -------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, values: Mapping[str, str | None]) -> None:
        with self.transaction():
            write_records(self._db, "meta", values)

    # -- outbox and sent (written through StateTransaction) -----------------------------

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

    def outbox_from(self, seq: int, limit: int) -> list[OutboxRow]:
        """Rows with ``seq`` at least ``seq``, oldest first."""
        rows = self._read(
            "SELECT seq, topic, payload, retain, cid, what, created_at FROM outbox "
            "WHERE seq >= ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            OutboxRow(
                int(s),
                str(t),
                bytes(p),
                bool(r),
                None if c is None else str(c),
                OutboxKind(w),
                float(at),
            )
            for s, t, p, r, c, w, at in rows
        ]

    def outbox_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM outbox")[0][0])

    def sent(self, cid: str | None = None, *, limit: int = 1_000_000) -> list[SentRow]:
        rows = self._read(
            "SELECT id, cid, epoch, chain, step, text, sent_at, published_at FROM sent "
            "WHERE (? IS NULL OR cid = ?) ORDER BY id LIMIT ?",
            (cid, cid, limit),
        )
        return [SentRow(*row) for row in rows]

    def sent_rows(self, ids: Sequence[int]) -> list[SentRow]:
        """Own messages by their ``sent`` id (those that exist), in id order."""
        marks = ",".join("?" * len(ids))
        rows = self._read(
            "SELECT id, cid, epoch, chain, step, text, sent_at, published_at FROM sent "  # noqa: S608 - placeholders only
            f"WHERE id IN ({marks}) ORDER BY id",
            tuple(ids),
        )
        return [SentRow(*row) for row in rows]

    def unconfirmed(self, before: float, after: float, limit: int) -> list[UnconfirmedRow]:
        """Published own messages in ``(after, before)`` still keeping their payload,
        oldest first."""
        rows = self._read(
            "SELECT id, cid, topic, payload, epoch, chain, step FROM sent "
            "WHERE payload IS NOT NULL AND published_at IS NOT NULL "
            "AND published_at < ? AND published_at > ? ORDER BY id LIMIT ?",
            (before, after, limit),
        )
        return [
            UnconfirmedRow(int(i), str(c), str(t), bytes(p), int(e), int(ch), int(st))
            for i, c, t, p, e, ch, st in rows
        ]

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
            for table in OWN_TABLES
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

    # -- received ---------------------------------------------------------------------

    def received(
        self,
        cid: str | None = None,
        *,
        after_id: int = 0,
        limit: int = 1_000_000,
    ) -> list[ReceivedRow]:
        rows = self._read(
            "SELECT id, cid, epoch, sender_index, chain, step, sender, kind, sent_at, text,"
            " received_at, read, trust FROM received WHERE (? IS NULL OR cid = ?) AND id > ?"
            " AND text IS NOT NULL ORDER BY id LIMIT ?",
            (cid, cid, after_id, limit),
        )
        return [
            ReceivedRow(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                r[9],
                r[10],
                bool(r[11]),
                Trust(r[12]),
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

    # -- held envelopes ---------------------------------------------------------------

    def held(self, *, reordering: bool = False) -> list[HeldRow]:
        """Held envelopes: waiting for a key, or (``reordering``) for a missing step."""
        rows = self._read(
            "SELECT id, cid, payload, until FROM held WHERE (until IS NULL) = ? ORDER BY id",
            (0 if reordering else 1,),
        )
        return [HeldRow(int(i), str(c), bytes(p), u) for i, c, p, u in rows]

    def held_payload(self, row: int) -> bytes | None:
        rows = self._read("SELECT payload FROM held WHERE id = ?", (row,))
        return bytes(rows[0][0]) if rows else None

    # -- gaps -------------------------------------------------------------------------

    def gaps(self, cid: str | None = None) -> list[Gap]:
        rows = self._read(
            "SELECT cid, epoch, sender_index, chain, first, last, sender, since FROM gaps "
            "WHERE (? IS NULL OR cid = ?) ORDER BY cid, epoch, sender_index, chain, first",
            (cid, cid),
        )
        return [Gap(*row) for row in rows]
