"""The archive keeps every unsigned candidate of a key and one signed envelope per key
(issue 13): unsigned junk can never displace or block the genuine envelope."""

from __future__ import annotations

import dataclasses
import time

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    LargeBinary,
    MetaData,
    Table,
    UniqueConstraint,
    insert,
)

from gateway import ArchiveBatch, open_store
from gateway._schema import SeqType, metadata, schema_version
from gateway._store import NewEnvelope

CID = "a" * 25 + "a"
PID = "c" * 25 + "a"


def envelope(step: int, data: bytes, *, signed: bool, sender: int = 0) -> NewEnvelope:
    return NewEnvelope(
        cid=CID,
        epoch=0,
        sender=sender,
        sender_pid=PID,
        chain=0,
        step=step,
        data=data,
        received_at=time.time(),
        signed=signed,
    )


# -- the store: candidates ----------------------------------------------------------------


async def test_unsigned_candidates_never_displace_or_block_the_signed_envelope(store):
    junk1, junk2 = b"\x01\x01\x00\x00\x00\x05" + b"j" * 30, b"\x01\x01\x00\x00\x00\x05" + b"k" * 30
    genuine, second = (
        b"\x01\x81\x00\x00\x00\x05" + b"g" * 94,
        b"\x01\x81\x00\x00\x00\x05" + b"h" * 94,
    )
    first = await store.commit(ArchiveBatch(envelopes=[envelope(5, junk1, signed=False)]))
    assert first.archived == 1
    again = await store.commit(
        ArchiveBatch(envelopes=[envelope(5, junk1, signed=False), envelope(5, junk2, signed=False)])
    )
    assert (again.archived, again.duplicates) == (1, 1)  # the same bytes once, others kept
    signed = await store.commit(ArchiveBatch(envelopes=[envelope(5, genuine, signed=True)]))
    assert signed.archived == 1  # unsigned junk of its key came first: it is archived anyway
    other = await store.commit(
        ArchiveBatch(
            envelopes=[envelope(5, second, signed=True), envelope(5, genuine, signed=True)]
        )
    )
    assert (other.archived, other.duplicates) == (0, 2)  # one signed envelope per key
    rows = await store.history(CID, after=0, limit=10)
    assert [r.data for r in rows] == [junk1, junk2, genuine]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)


def _legacy_tables(md: MetaData) -> None:
    """``envelopes`` and ``rosters`` as schema version 1 made them (before candidates)."""
    Table(
        "envelopes",
        md,
        Column("seq", SeqType, primary_key=True, autoincrement=True),
        Column("cid", metadata.tables["envelopes"].c.cid.type, nullable=False),
        Column("epoch", BigInteger, nullable=False),
        Column("sender", BigInteger, nullable=False),
        Column("sender_pid", metadata.tables["envelopes"].c.cid.type, nullable=False),
        Column("chain", BigInteger, nullable=False),
        Column("step", BigInteger, nullable=False),
        Column("data", LargeBinary, nullable=False),
        Column("received_at", Float, nullable=False),
        UniqueConstraint("cid", "epoch", "sender", "chain", "step", name="envelopes_dedupe"),
        Index("envelopes_cid_seq", "cid", "seq"),
        sqlite_autoincrement=True,
    )
    Table(
        "rosters",
        md,
        Column("cid", metadata.tables["rosters"].c.cid.type, primary_key=True),
        Column("epoch", BigInteger, primary_key=True),
        Column("digest", LargeBinary, nullable=False),
        Column("data", LargeBinary, nullable=False),
    )


async def test_migration_3_keeps_every_envelope_and_cursor_and_admits_candidates(database_url):
    legacy = MetaData()
    _legacy_tables(legacy)
    others = [
        t
        for t in metadata.sorted_tables
        if t.name not in ("envelopes", "rosters", "held_rosters", "fieldchat_schema")
    ]
    unsigned = b"\x01\x01\x00\x00\x00\x01" + b"u" * 30
    signed = b"\x01\x81\x00\x00\x00\x02" + b"s" * 94
    db = open_store(database_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(legacy.create_all)
            await conn.run_sync(lambda c: metadata.create_all(c, tables=[schema_version, *others]))
            await conn.execute(insert(schema_version).values(version=1))
            for step, data in ((1, unsigned), (2, signed), (3, signed[:-1] + b"t")):
                row = dataclasses.asdict(envelope(step, data, signed=True))
                del row["signed"]
                await conn.execute(insert(legacy.tables["envelopes"]).values(**row))
        assert await db.migrate() == 3
        before = await db.history(CID, after=0, limit=10)
        assert [(r.seq, r.step, r.data) for r in before] == [
            (1, 1, unsigned),
            (2, 2, signed),
            (3, 3, signed[:-1] + b"t"),
        ]
        result = await db.commit(
            ArchiveBatch(
                envelopes=[
                    envelope(1, unsigned, signed=False),  # the old row again: a duplicate
                    envelope(1, unsigned[:-1] + b"v", signed=False),  # a second candidate
                    envelope(2, signed[:-1] + b"x", signed=True),  # a second signed one
                ]
            )
        )
        assert (result.archived, result.duplicates) == (1, 2)
        assert result.max_seq is not None
        assert result.max_seq > 3  # the cursor goes on from the old rows
        assert await db.migrate() == 3  # idempotent
    finally:
        await db.close()
