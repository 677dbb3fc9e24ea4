"""The archive's writes, once for both engines: one batch in one transaction, canaries,
and the schema migrations. Functions of a SQLAlchemy ``Connection``, run by a
:class:`~gateway._db.Database` (which opens and commits the transaction).

On PostgreSQL several gateways write at once: an archive commit takes a
transaction-level advisory lock before it draws sequence numbers, so ``seq`` order is
commit order and a reader following "seq > cursor" skips nothing. SQLite has one
writer (``BEGIN IMMEDIATE`` in one thread), which gives the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, delete, func, select, text
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from fieldchat.gateway._schema import (
    MIGRATIONS,
    SIGNED_DIGEST,
    bundles,
    canaries,
    candidate_digest,
    conv_heads,
    envelopes,
    grants,
    held_rosters,
    pending,
    roster_members,
    rosters,
    schema_version,
)
from fieldchat.gateway._store import ArchiveBatch, ArchiveResult, NewEnvelope

__all__ = ["commit_batch", "dialect_insert", "migrate", "record_canary", "upsert_bundles"]

ARCHIVE_LOCK = 0x66_63_61_72  # "fcar": pg_advisory_xact_lock key of archive commits
MIGRATE_LOCK = 0x66_63_6D_67  # "fcmg": gateways starting together migrate once
CANARY_KEEP_S = 600.0  # a canary is looked for seconds after it was noted; keep 10 min


def dialect_insert(conn: Connection, table: Table) -> Any:  # noqa: ANN401 - dialect Insert
    """The connection's dialect's ``INSERT`` (it has ``ON CONFLICT``)."""
    if conn.dialect.name == "postgresql":
        return pg_dialect.insert(table)
    return sqlite_dialect.insert(table)


def _advisory_lock(conn: Connection, key: int) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def migrate(conn: Connection) -> int:
    """Apply the missing migrations in order; return the schema version."""
    _advisory_lock(conn, MIGRATE_LOCK)  # concurrent starts migrate once
    schema_version.create(conn, checkfirst=True)
    current = conn.execute(select(func.max(schema_version.c.version))).scalar()
    version = current or 0
    for number, _what, step in MIGRATIONS:
        if number > version:
            step(conn)
            version = number
    if version != (current or 0):
        conn.execute(delete(schema_version))
        conn.execute(schema_version.insert().values(version=version))
    return version


def upsert_bundles(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Keep each pid's newest bundle (``{"pid", "created_at", "data"}`` rows)."""
    stmt = dialect_insert(conn, bundles)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[bundles.c.pid],
            set_={"created_at": stmt.excluded.created_at, "data": stmt.excluded.data},
            where=bundles.c.created_at < stmt.excluded.created_at,
        ),
        rows,
    )


def commit_batch(conn: Connection, batch: ArchiveBatch) -> ArchiveResult:
    """Write one archive batch (see ``HistoryStore.commit``); the caller commits."""
    _advisory_lock(conn, ARCHIVE_LOCK)
    roster_count = grant_count = archived = 0
    max_seq: int | None = None
    if batch.rosters:
        roster_count = _insert_rosters(conn, batch)
    if batch.bundles:
        newest: dict[str, tuple[int, bytes]] = {}
        for pid, created_at, data in batch.bundles:
            if pid not in newest or newest[pid][0] < created_at:
                newest[pid] = (created_at, data)
        upsert_bundles(
            conn, [{"pid": p, "created_at": c, "data": d} for p, (c, d) in newest.items()]
        )
    if batch.grants:
        result = conn.execute(
            dialect_insert(conn, grants).on_conflict_do_nothing().returning(grants.c.seq),
            [
                {
                    "recipient": g.recipient,
                    "cid": g.cid,
                    "granter": g.granter,
                    "digest": g.digest,
                    "data": g.data,
                    "received_at": g.received_at,
                }
                for g in batch.grants
            ],
        )
        grant_count = len(result.all())
    if batch.released:
        conn.execute(delete(held_rosters).where(held_rosters.c.id.in_(batch.released)))
    if batch.held:
        conn.execute(
            dialect_insert(conn, held_rosters).on_conflict_do_nothing(),
            [
                {
                    "cid": h.cid,
                    "epoch": h.epoch,
                    "digest": h.digest,
                    "data": h.data,
                    "source": h.source,
                    "received_at": h.received_at,
                }
                for h in batch.held
            ],
        )
    if batch.resolved:
        conn.execute(delete(pending).where(pending.c.id.in_(batch.resolved)))
    if batch.pending:
        conn.execute(
            pending.insert(),
            [
                {
                    "cid": p.cid,
                    "epoch": p.epoch,
                    "sender": p.sender,
                    "sender_pid": p.sender_pid,
                    "data": p.data,
                    "received_at": p.received_at,
                }
                for p in batch.pending
            ],
        )
    if batch.envelopes:
        archived, max_seq = _insert_envelopes(conn, batch.envelopes)
    return ArchiveResult(
        archived=archived,
        duplicates=len(batch.envelopes) - archived,
        rosters=roster_count,
        grants=grant_count,
        max_seq=max_seq,
    )


def _insert_rosters(conn: Connection, batch: ArchiveBatch) -> int:
    """Rosters, their members and each conversation's newest epoch; new rosters."""
    result = conn.execute(
        dialect_insert(conn, rosters).on_conflict_do_nothing().returning(rosters.c.cid),
        [
            {
                "cid": r.cid,
                "epoch": r.epoch,
                "digest": r.digest,
                "data": r.data,
                "signer": r.signer,
                "archived_at": r.archived_at,
            }
            for r in batch.rosters
        ],
    )
    count = len(result.all())
    conn.execute(
        dialect_insert(conn, roster_members).on_conflict_do_nothing(),
        [{"cid": r.cid, "epoch": r.epoch, "pid": pid} for r in batch.rosters for pid in r.members],
    )
    heads: dict[str, int] = {}
    for r in batch.rosters:
        heads[r.cid] = max(r.epoch, heads.get(r.cid, -1))
    stmt = dialect_insert(conn, conv_heads)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[conv_heads.c.cid],
            set_={"epoch": stmt.excluded.epoch},
            where=conv_heads.c.epoch < stmt.excluded.epoch,
        ),
        [{"cid": c, "epoch": e} for c, e in heads.items()],
    )
    return count


# The envelope columns an insert sets, in the order of ``_envelope_row``.
_ENVELOPE_KEYS = (
    "cid",
    "epoch",
    "sender",
    "sender_pid",
    "chain",
    "step",
    "data",
    "received_at",
    "digest",
)
# SQLite's text of the one envelope insert (the statement below, compiled once): the
# archive's hot write runs it as one driver ``executemany`` of plain tuples. Through
# SQLAlchemy's parameter handling (a dict and bound-parameter processing per row) the
# writer thread spent ≈ 2.5 times the CPU per envelope (BENCHMARKS.md).
_SQLITE_INSERT_ENVELOPE = str(
    sqlite_dialect.insert(envelopes)
    .on_conflict_do_nothing()
    .compile(dialect=sqlite_dialect.dialect(), column_keys=list(_ENVELOPE_KEYS))
)


_SQLITE_MAX_SEQ = str(select(func.max(envelopes.c.seq)).compile(dialect=sqlite_dialect.dialect()))


def _envelope_row(e: NewEnvelope) -> tuple[Any, ...]:
    """The values of ``_ENVELOPE_KEYS`` (the unique key and ``digest``: gateway/_schema.py)."""
    digest = SIGNED_DIGEST if e.signed else candidate_digest(e.data)
    return (e.cid, e.epoch, e.sender, e.sender_pid, e.chain, e.step, e.data, e.received_at, digest)


def _insert_envelopes(conn: Connection, rows: Sequence[NewEnvelope]) -> tuple[int, int | None]:
    """Insert idempotently; return (new rows, the largest new seq or None).

    The new rows' numbers come back by ``RETURNING`` on PostgreSQL (SQLAlchemy sends
    the batch as multi-row ``INSERT``s, 1,000 rows a statement). On SQLite one
    ``executemany`` without it is cheaper, and the numbers follow from the one writer:
    the rows this transaction added are the newest, and AUTOINCREMENT never reuses one.
    """
    values = [_envelope_row(e) for e in rows]
    if conn.dialect.name == "sqlite":
        # On the driver's cursor, in this transaction: a SQLAlchemy execution costs
        # ≈ 80 µs of its own, which a live stream of small batches pays per batch.
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(_SQLITE_INSERT_ENVELOPE, values)
            added = int(cursor.rowcount)
            top = int(cursor.execute(_SQLITE_MAX_SEQ).fetchone()[0]) if added else None
        finally:
            cursor.close()
        return added, top
    stmt = pg_dialect.insert(envelopes).on_conflict_do_nothing().returning(envelopes.c.seq)
    result = conn.execute(stmt, [dict(zip(_ENVELOPE_KEYS, v, strict=True)) for v in values])
    seqs = [row[0] for row in result]
    return len(seqs), max(seqs, default=None)


def record_canary(conn: Connection, nonce: bytes, seen_at: float) -> None:
    """Note a canary's nonce (``gateway/_routing.py``); forget those long looked for."""
    conn.execute(delete(canaries).where(canaries.c.seen_at < seen_at - CANARY_KEEP_S))
    conn.execute(
        dialect_insert(conn, canaries).on_conflict_do_nothing(),
        {"nonce": nonce, "seen_at": seen_at},
    )
