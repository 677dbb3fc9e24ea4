"""The writes of one state-file transaction, typed (:meth:`DeviceState.transaction`).

Every change the device makes to its tables goes through one of these methods while
a transaction is open, so the rows commit atomically with the engine's records (the
engine's own writes join the same transaction through :meth:`DeviceState.save`).
The object is only valid inside its ``with`` block; nested blocks share it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from fieldchat.device.rows import (
    ARCHIVED,
    NOT_ARCHIVED,
    REFUSED,
    Gap,
    OutboxKind,
    OutboxRow,
    StepInConversation,
    Trust,
)

__all__ = ["MAX_HELD", "MAX_KEPT", "OWN_TABLES", "StateTransaction"]

MAX_HELD = 10_000  # envelopes held for a missing grant; past it the oldest are dropped (logged)
MAX_KEPT = 10_000  # own receipts and controls kept for gap requests; past it the oldest go
OWN_TABLES = ("sent", "kept")


class StateTransaction:
    """Writes inside an open transaction of the state file.

    ``on_outbox`` is told when an outbox row is written (the state file then knows
    the commit carries rows to sync before they are published).
    """

    def __init__(
        self, db: sqlite3.Connection, clock: Callable[[], float], on_outbox: Callable[[], None]
    ) -> None:
        self._db = db
        self._clock = clock
        self._on_outbox = on_outbox

    def execute(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        """Raw SQL in this transaction: for migrations and tests that damage a file on
        purpose, not for the device's rules (they use the typed methods)."""
        return self._db.execute(sql, args)

    # -- outbox, sent, kept -----------------------------------------------------------

    def add_outbox(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        cid: str | None = None,
        what: OutboxKind = OutboxKind.MSG,
    ) -> int:
        """Queue a publication; its outbox sequence number."""
        self._on_outbox()
        cur = self._db.execute(
            "INSERT INTO outbox (topic, payload, retain, cid, what, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, int(retain), cid, str(what), self._clock()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def add_sent(
        self,
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
        """Record an own text (history; ciphertext kept for resends); its row id."""
        cur = self._db.execute(
            "INSERT INTO sent (cid, epoch, sender_index, chain, step, text, sent_at, topic,"
            " payload, outbox_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cid,
                epoch,
                sender_index,
                chain,
                step,
                text,
                self._clock(),
                topic,
                payload,
                outbox_seq,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def add_kept(
        self, cid: str, header: StepInConversation, topic: str, payload: bytes, outbox_seq: int
    ) -> None:
        """Keep an own receipt or control (``header``: epoch, sender index, chain,
        step) for gap requests; texts are kept in ``sent``."""
        epoch, sender_index, chain, step = header
        self._db.execute(
            "INSERT OR REPLACE INTO kept (cid, epoch, sender_index, chain, step, topic, payload,"
            " outbox_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, epoch, sender_index, chain, step, topic, payload, outbox_seq),
        )

    def prune_kept(self, published_before: float, *, keep_unarchived: bool = False) -> int:
        """Forget kept receipts and controls published before ``published_before`` (with
        ``keep_unarchived``, only those the archive confirmed), and the oldest beyond
        MAX_KEPT whatever the archive says; how many went."""
        gone = self._db.execute(
            "DELETE FROM kept WHERE published_at < ? AND (archived != 0 OR ? = 0)",
            (published_before, int(keep_unarchived)),
        ).rowcount
        (count,) = self._db.execute("SELECT COUNT(*) FROM kept").fetchone()
        excess = int(count) - MAX_KEPT
        if excess > 0:
            self._db.execute(
                "DELETE FROM kept WHERE rowid IN (SELECT rowid FROM kept ORDER BY outbox_seq "
                "LIMIT ?)",
                (excess,),
            )
            gone += excess
        return int(gone)

    def acknowledged(self, seqs: Sequence[int], at: float) -> None:
        """The broker acknowledged these outbox rows: drop them, date the sent rows."""
        self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
        for table in OWN_TABLES:
            self._db.executemany(
                f"UPDATE {table} SET published_at = ? "  # noqa: S608 - a constant
                "WHERE outbox_seq = ? AND published_at IS NULL",
                [(at, s) for s in seqs],
            )

    def refused(self, seqs: Sequence[int]) -> list[OutboxRow]:
        """The broker refused these outbox rows for good (MQTT 5 negative PUBACK): they
        leave the outbox and are never published again. An own text stays in ``sent``
        (the local history) without its ciphertext and without a publication time
        (neither resent, nor served to a gap request, nor given to the archive); an
        own receipt or control leaves ``kept``. Returns the rows as they were."""
        marks = ",".join("?" * len(seqs))
        rows = [
            OutboxRow(
                int(s), str(t), bytes(p), bool(r), None if c is None else str(c), OutboxKind(w), at
            )
            for s, t, p, r, c, w, at in self._db.execute(
                "SELECT seq, topic, payload, retain, cid, what, created_at FROM outbox "  # noqa: S608
                f"WHERE seq IN ({marks}) ORDER BY seq",  # only placeholders go in
                list(seqs),
            )
        ]
        args = [(s,) for s in seqs]
        self._db.executemany("DELETE FROM outbox WHERE seq = ?", args)
        self._db.executemany("DELETE FROM kept WHERE outbox_seq = ?", args)
        self._db.executemany(
            "UPDATE sent SET payload = NULL, archived = ? WHERE outbox_seq = ?",
            [(REFUSED, s) for s in seqs],
        )
        return rows

    def forget_payloads(self, ids: Sequence[int], *, keep_unarchived: bool = False) -> None:
        """Drop the kept ciphertext of messages that need no resending any more (with
        ``keep_unarchived``, not of those the archive has not confirmed yet)."""
        self._db.executemany(
            "UPDATE sent SET payload = NULL WHERE id = ? AND (archived != 0 OR ? = 0)",
            [(i, int(keep_unarchived)) for i in ids],
        )

    def forget_old_payloads(self, published_before: float, *, keep_unarchived: bool = False) -> int:
        """Drop the ciphertext of own texts published before ``published_before`` (no
        longer resent after a reconnect: ``resend_window_s``); with ``keep_unarchived``,
        not of those the archive has not confirmed. How many."""
        return int(
            self._db.execute(
                "UPDATE sent SET payload = NULL WHERE payload IS NOT NULL "
                "AND published_at < ? AND (archived != 0 OR ? = 0)",
                (published_before, int(keep_unarchived)),
            ).rowcount
        )

    def mark_archived(
        self, keys: Sequence[tuple[str, int, int, int]], value: int = ARCHIVED
    ) -> None:
        """The archive confirmed (or, ``REFUSED``, refused for good) these own envelopes:
        ``(cid, epoch, chain, step)``."""
        for table in OWN_TABLES:
            self._db.executemany(
                f"UPDATE {table} SET archived = ? "  # noqa: S608 - a constant
                "WHERE cid = ? AND epoch = ? AND chain = ? AND step = ?",
                [(value, *key) for key in keys],
            )

    def give_up_archive(self, cid: str) -> None:
        """No longer keep own envelopes of ``cid`` for the archive (we left it)."""
        for table in OWN_TABLES:
            self._db.execute(
                f"UPDATE {table} SET archived = ? WHERE cid = ? AND archived = ?",  # noqa: S608
                (REFUSED, cid, NOT_ARCHIVED),
            )

    # -- receipts and received --------------------------------------------------------

    def add_receipt(
        self, cid: str, pid: str, rtype: int, epoch: int, chain: int, first: int, last: int
    ) -> None:
        """``pid`` receipted steps ``first..last`` of our chain (delivered or read)."""
        self._db.execute(
            "INSERT INTO receipts (cid, pid, type, epoch, chain, first, last, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, pid, rtype, epoch, chain, first, last, self._clock()),
        )

    def add_received(
        self,
        cid: str,
        epoch: int,
        sender_index: int,
        chain: int,
        step: int,
        sender: str,
        kind: int,
        sent_at: int | None,
        text: str | None,
        trust: Trust = Trust.AUTHENTIC,
    ) -> int | None:
        """Insert a received message; its id, or ``None`` when it is a duplicate."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO received (cid, epoch, sender_index, chain, step, sender, kind,"
            " sent_at, text, received_at, trust) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cid,
                epoch,
                sender_index,
                chain,
                step,
                sender,
                int(kind),
                sent_at,
                text,
                self._clock(),
                int(trust),
            ),
        )
        return cur.lastrowid if cur.rowcount == 1 else None

    def settle(
        self, cid: str, chain: tuple[int, int, int], steps: tuple[int, ...], trust: Trust
    ) -> None:
        """Record what delayed authentication found of pending messages (§6.5)."""
        self._db.executemany(
            "UPDATE received SET trust = ? WHERE cid = ? AND epoch = ? AND sender_index = ?"
            " AND chain = ? AND step = ? AND trust = ?",
            [(int(trust), cid, *chain, step, int(Trust.PENDING)) for step in steps],
        )

    def mark_read(self, cid: str) -> list[StepInConversation]:
        """Mark every unread text of ``cid`` read: ``(epoch, sender_index, chain, step)``."""
        rows = self._db.execute(
            "SELECT epoch, sender_index, chain, step FROM received "
            "WHERE cid = ? AND read = 0 AND text IS NOT NULL",
            (cid,),
        ).fetchall()
        self._db.execute("UPDATE received SET read = 1 WHERE cid = ? AND read = 0", (cid,))
        return [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]

    # -- held envelopes ---------------------------------------------------------------

    def hold(self, cid: str, payload: bytes, until: float | None = None) -> tuple[int, int]:
        """Keep an envelope for later: its row id, and how many of the oldest rows
        were dropped to stay within MAX_HELD (the caller logs them)."""
        cur = self._db.execute(
            "INSERT INTO held (cid, payload, held_at, until) VALUES (?, ?, ?, ?)",
            (cid, payload, self._clock(), until),
        )
        (count,) = self._db.execute("SELECT COUNT(*) FROM held").fetchone()
        excess = int(count) - MAX_HELD
        if excess > 0:
            self._db.execute(
                "DELETE FROM held WHERE id IN (SELECT id FROM held ORDER BY id LIMIT ?)",
                (excess,),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid, max(0, excess)

    def unhold(self, ids: Sequence[int]) -> None:
        self._db.executemany("DELETE FROM held WHERE id = ?", [(i,) for i in ids])

    def take_held(self, row: int) -> bytes | None:
        """A held envelope's payload, no longer held (``None``: dropped meanwhile)."""
        found = self._db.execute("SELECT payload FROM held WHERE id = ?", (row,)).fetchone()
        self.unhold([row])
        return None if found is None else bytes(found[0])

    # -- gaps -------------------------------------------------------------------------

    def add_gap(self, gap: Gap) -> None:
        self._db.execute(
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

    def fill_gap(self, cid: str, epoch: int, sender_index: int, chain: int, step: int) -> bool:
        """Remove ``step`` from the gap containing it (splitting it); whether one did."""
        row = self._db.execute(
            "SELECT first, last, sender, since FROM gaps WHERE cid = ? AND epoch = ? AND "
            "sender_index = ? AND chain = ? AND first <= ? AND last >= ?",
            (cid, epoch, sender_index, chain, step, step),
        ).fetchone()
        if row is None:
            return False
        first, last, sender, since = row
        self.drop_gap(Gap(cid, epoch, sender_index, chain, first, last, sender, since))
        for lo, hi in ((first, step - 1), (step + 1, last)):
            if lo <= hi:
                self.add_gap(Gap(cid, epoch, sender_index, chain, lo, hi, sender, since))
        return True

    def drop_gap(self, gap: Gap) -> None:
        self._db.execute(
            "DELETE FROM gaps WHERE cid = ? AND epoch = ? AND sender_index = ? AND chain = ? "
            "AND first = ?",
            (gap.cid, gap.epoch, gap.sender_index, gap.chain, gap.first),
        )
