"""The history and account store on SQLAlchemy Core: SQLite (WAL) and PostgreSQL.

Both implement :class:`~gateway._store.HistoryStore` and
:class:`~gateway._store.AccountStore`; they differ only where the engines do:

* SQLite has one writer. Writes from this process are serialised by an asyncio
  lock, so a deferred transaction never has to upgrade its lock and fail with
  "database is locked"; readers run in parallel under WAL.
* PostgreSQL lets several gateways write at once. An archive commit takes a
  transaction-level advisory lock before it draws sequence numbers, so ``seq``
  order is commit order and a reader following "seq > cursor" skips nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Select, and_, case, delete, event, func, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fieldchat.gateway._errors import NameTaken, StorageError
from fieldchat.gateway._schema import (
    MIGRATIONS,
    SIGNED_DIGEST,
    accounts,
    bundles,
    canaries,
    candidate_digest,
    claim_challenges,
    conv_heads,
    envelopes,
    gateway_secrets,
    grants,
    held_rosters,
    participants,
    pending,
    request_nonces,
    roster_members,
    rosters,
    schema_version,
    sessions,
)
from fieldchat.gateway._store import (
    Account,
    ArchiveBatch,
    ArchiveResult,
    ChainSteps,
    EnvelopeKey,
    HeldRoster,
    NewEnvelope,
    PendingEnvelope,
    RosterRecord,
    StoredEnvelope,
    StoredGrant,
)
from fieldchat.schemas import Bundle
from fieldchat.schemas.errors import ConfigError

__all__ = ["PostgresStore", "SqlStore", "SqliteStore", "open_store"]

_ARCHIVE_LOCK = 0x66_63_61_72  # "fcar": pg_advisory_xact_lock key of archive commits
_MIGRATE_LOCK = 0x66_63_6D_67  # "fcmg": gateways starting together migrate once
_MEMBER_CACHE_MAX = 100_000
_CANARY_KEEP_S = 600.0  # a canary is looked for seconds after it was noted; keep 10 min
# The unique index is the key and ``digest``: empty for a signed envelope (one per
# key), the candidate digest of an unsigned one (gateway/_schema.py, ``envelopes``).
_INSERT_ENVELOPE = (
    "INSERT INTO envelopes (cid, epoch, sender, sender_pid, chain, step, data, received_at,"
    " digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_REMEMBER_NONCE = (
    "INSERT INTO request_nonces (pid, nonce, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (pid, nonce) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE request_nonces.expires_at <= ?"
)
_HISTORY_COLUMNS = "SELECT seq, cid, epoch, sender, sender_pid, chain, step, data FROM envelopes"
_HISTORY_AFTER = _HISTORY_COLUMNS + " WHERE cid = ? AND seq > ? ORDER BY seq LIMIT ?"
_HISTORY_BEFORE = _HISTORY_COLUMNS + " WHERE cid = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
_HISTORY_NEWEST = _HISTORY_COLUMNS + " WHERE cid = ? ORDER BY seq DESC LIMIT ?"
_SINCE = _HISTORY_COLUMNS + " WHERE seq > ? ORDER BY seq LIMIT ?"
_HISTORY_KEYS = (
    "SELECT seq, epoch, sender, chain, step FROM envelopes WHERE cid = ? AND seq > ?"
    " ORDER BY seq LIMIT ?"
)
_ENVELOPE_COLUMNS = (
    envelopes.c.seq,
    envelopes.c.cid,
    envelopes.c.epoch,
    envelopes.c.sender,
    envelopes.c.sender_pid,
    envelopes.c.chain,
    envelopes.c.step,
    envelopes.c.data,
)


@asynccontextmanager
async def _mapped(what: str) -> AsyncIterator[None]:
    """Map driver and SQLAlchemy errors to :class:`StorageError` once, here."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise StorageError(f"database error while {what}: {type(exc).__name__}") from exc


def _envelope_rows(batch: Sequence[NewEnvelope]) -> list[tuple[Any, ...]]:
    """The columns of ``_INSERT_ENVELOPE`` (inline: the archive's hot path)."""
    return [
        (
            e.cid,
            e.epoch,
            e.sender,
            e.sender_pid,
            e.chain,
            e.step,
            e.data,
            e.received_at,
            SIGNED_DIGEST if e.signed else candidate_digest(e.data),
        )
        for e in batch
    ]


def _held(row: Any) -> HeldRoster:  # noqa: ANN401 - a SQLAlchemy Row
    return HeldRoster(
        cid=row.cid,
        epoch=row.epoch,
        digest=bytes(row.digest),
        data=bytes(row.data),
        source=row.source,
        received_at=row.received_at,
        id=row.id,
    )


def _envelope(row: Any) -> StoredEnvelope:  # noqa: ANN401 - a SQLAlchemy Row
    return StoredEnvelope(
        seq=row.seq,
        cid=row.cid,
        epoch=row.epoch,
        sender=row.sender,
        sender_pid=row.sender_pid,
        chain=row.chain,
        step=row.step,
        data=bytes(row.data),
    )


class SqlStore:
    """Shared SQL of both engines; use :func:`open_store` or a subclass."""

    dialect_insert: Any = None  # the dialect's ``insert`` (ON CONFLICT support)

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # (cid, pid) pairs known to be members. Rosters are append-only (never deleted),
        # so "some archived roster of cid lists pid" never becomes false: positive
        # answers are cached (bounded), negative ones are always asked again.
        self._members: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _member_known(self, cid: str, pids: Collection[str]) -> bool:
        for pid in pids:
            if (cid, pid) in self._members:
                self._members.move_to_end((cid, pid))
                return True
        return False

    def _remember_member(self, cid: str, pid: str) -> None:
        self._members[(cid, pid)] = None
        while len(self._members) > _MEMBER_CACHE_MAX:
            self._members.popitem(last=False)

    # -- engine-specific hooks ---------------------------------------------------------

    def _write_lock(self) -> AbstractAsyncContextManager[None]:
        return nullcontext()

    async def _serialise_archive(self, conn: AsyncConnection) -> None:
        """Make seq order equal commit order (see module docstring)."""

    async def _migration_lock(self, conn: AsyncConnection) -> None:
        """Keep concurrent starts from migrating twice."""

    # -- lifecycle ---------------------------------------------------------------------

    async def migrate(self) -> int:
        """Apply the missing migrations in order; return the schema version.

        Raises:
            StorageError: the database failed.
        """
        async with _mapped("migrating"), self._write_lock(), self.engine.begin() as conn:
            await self._migration_lock(conn)
            await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
            current = (await conn.execute(select(func.max(schema_version.c.version)))).scalar()
            version = current or 0
            for number, _what, step in MIGRATIONS:
                if number > version:
                    await conn.run_sync(step)
                    version = number
            if version != (current or 0):
                await conn.execute(delete(schema_version))
                await conn.execute(schema_version.insert().values(version=version))
            return version

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with _mapped("pinging"), self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # -- archive -----------------------------------------------------------------------

    async def commit(self, batch: ArchiveBatch) -> ArchiveResult:
        """Write one archive batch in one transaction (see ``HistoryStore.commit``).

        Raises:
            StorageError: nothing was written.
        """
        ins = self.dialect_insert
        archived = roster_count = grant_count = 0
        max_seq: int | None = None
        async with _mapped("archiving"), self._write_lock(), self.engine.begin() as conn:
            await self._serialise_archive(conn)
            if batch.rosters:
                result = await conn.execute(
                    ins(rosters).on_conflict_do_nothing().returning(rosters.c.cid),
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
                roster_count = len(result.all())
                await conn.execute(
                    ins(roster_members).on_conflict_do_nothing(),
                    [
                        {"cid": r.cid, "epoch": r.epoch, "pid": pid}
                        for r in batch.rosters
                        for pid in r.members
                    ],
                )
                heads: dict[str, int] = {}
                for r in batch.rosters:
                    heads[r.cid] = max(r.epoch, heads.get(r.cid, -1))
                stmt = ins(conv_heads)
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[conv_heads.c.cid],
                        set_={"epoch": stmt.excluded.epoch},
                        where=conv_heads.c.epoch < stmt.excluded.epoch,
                    ),
                    [{"cid": c, "epoch": e} for c, e in heads.items()],
                )
            if batch.bundles:
                newest: dict[str, tuple[int, bytes]] = {}
                for pid, created_at, data in batch.bundles:
                    if pid not in newest or newest[pid][0] < created_at:
                        newest[pid] = (created_at, data)
                stmt = ins(bundles)
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[bundles.c.pid],
                        set_={"created_at": stmt.excluded.created_at, "data": stmt.excluded.data},
                        where=bundles.c.created_at < stmt.excluded.created_at,
                    ),
                    [{"pid": p, "created_at": c, "data": d} for p, (c, d) in newest.items()],
                )
            if batch.grants:
                result = await conn.execute(
                    ins(grants).on_conflict_do_nothing().returning(grants.c.seq),
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
                await conn.execute(
                    delete(held_rosters).where(held_rosters.c.id.in_(batch.released))
                )
            if batch.held:
                await conn.execute(
                    ins(held_rosters).on_conflict_do_nothing(),
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
                await conn.execute(delete(pending).where(pending.c.id.in_(batch.resolved)))
            if batch.pending:
                await conn.execute(
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
                archived, max_seq = await self._insert_envelopes(conn, batch.envelopes)
        return ArchiveResult(
            archived=archived,
            duplicates=len(batch.envelopes) - archived,
            rosters=roster_count,
            grants=grant_count,
            max_seq=max_seq,
        )

    async def _insert_envelopes(
        self, conn: AsyncConnection, rows: Sequence[NewEnvelope]
    ) -> tuple[int, int | None]:
        """Insert idempotently; return (new rows, the largest new seq or None)."""
        result = await conn.execute(
            self.dialect_insert(envelopes).on_conflict_do_nothing().returning(envelopes.c.seq),
            [
                {
                    "cid": e.cid,
                    "epoch": e.epoch,
                    "sender": e.sender,
                    "sender_pid": e.sender_pid,
                    "chain": e.chain,
                    "step": e.step,
                    "data": e.data,
                    "received_at": e.received_at,
                    "digest": SIGNED_DIGEST if e.signed else candidate_digest(e.data),
                }
                for e in rows
            ],
        )
        seqs = [row[0] for row in result.all()]
        return len(seqs), max(seqs, default=None)

    # -- reads -------------------------------------------------------------------------

    async def _scalar(self, stmt: Select[Any], what: str) -> Any:  # noqa: ANN401
        async with _mapped(what), self.engine.connect() as conn:
            return (await conn.execute(stmt)).scalar()

    async def _rows(self, stmt: Select[Any], what: str) -> Sequence[Any]:
        async with _mapped(what), self.engine.connect() as conn:
            rows: Sequence[Any] = (await conn.execute(stmt)).all()
            return rows

    async def roster(self, cid: str, epoch: int) -> bytes | None:
        data = await self._scalar(
            select(rosters.c.data).where(rosters.c.cid == cid, rosters.c.epoch == epoch),
            "reading a roster",
        )
        return bytes(data) if data is not None else None

    async def rosters(self, cid: str) -> list[RosterRecord]:
        rows = await self._rows(
            select(rosters).where(rosters.c.cid == cid).order_by(rosters.c.epoch),
            "reading rosters",
        )
        members = await self._rows(
            select(roster_members.c.epoch, roster_members.c.pid).where(roster_members.c.cid == cid),
            "reading roster members",
        )
        by_epoch: dict[int, list[str]] = {}
        for m in members:
            by_epoch.setdefault(m.epoch, []).append(m.pid)
        return [
            RosterRecord(
                r.cid, r.epoch, bytes(r.digest), tuple(by_epoch.get(r.epoch, ())), bytes(r.data)
            )
            for r in rows
        ]

    async def roster_head(self, cid: str) -> tuple[int, bytes] | None:
        rows = await self._rows(
            select(rosters.c.epoch, rosters.c.data)
            .where(rosters.c.cid == cid)
            .order_by(rosters.c.epoch.desc())
            .limit(1),
            "reading a roster",
        )
        return (int(rows[0].epoch), bytes(rows[0].data)) if rows else None

    async def foundings(self, signer: str, *, since: float) -> int:
        return int(
            await self._scalar(
                select(func.count())
                .select_from(rosters)
                .where(
                    rosters.c.signer == signer,
                    rosters.c.archived_at >= since,
                    rosters.c.epoch == 0,
                ),
                "counting foundings",
            )
        )

    async def held_rosters(
        self, *, cids: Collection[str] = (), limit: int = 1000
    ) -> list[HeldRoster]:
        stmt = select(held_rosters).order_by(held_rosters.c.id).limit(limit)
        if cids:
            stmt = stmt.where(held_rosters.c.cid.in_(list(cids)))
        return [_held(r) for r in await self._rows(stmt, "reading held rosters")]

    async def held_counts(self, cid: str) -> tuple[int, int]:
        count = func.count()
        async with _mapped("counting held rosters"), self.engine.connect() as conn:
            mine = (
                await conn.execute(
                    select(count).select_from(held_rosters).where(held_rosters.c.cid == cid)
                )
            ).scalar()
            every = (await conn.execute(select(count).select_from(held_rosters))).scalar()
        return int(mine or 0), int(every or 0)

    async def pending_counts(self, cid: str) -> dict[tuple[int, int], int]:
        rows = await self._rows(
            select(pending.c.epoch, pending.c.sender, func.count().label("n"))
            .where(pending.c.cid == cid)
            .group_by(pending.c.epoch, pending.c.sender),
            "counting pending envelopes",
        )
        return {(int(r.epoch), int(r.sender)): int(r.n) for r in rows}

    async def bundle(self, pid: str) -> bytes | None:
        data = await self._scalar(
            select(bundles.c.data).where(bundles.c.pid == pid), "reading a bundle"
        )
        return bytes(data) if data is not None else None

    async def pending(
        self, *, cids: Collection[str] = (), pids: Collection[str] = (), limit: int = 1000
    ) -> list[PendingEnvelope]:
        stmt = select(pending).order_by(pending.c.id).limit(limit)
        if cids or pids:
            conds = []
            if cids:
                conds.append(pending.c.cid.in_(list(cids)))
            if pids:
                conds.append(pending.c.sender_pid.in_(list(pids)))
            stmt = stmt.where(conds[0] if len(conds) == 1 else conds[0] | conds[1])
        rows = await self._rows(stmt, "reading pending envelopes")
        return [
            PendingEnvelope(
                cid=r.cid,
                epoch=r.epoch,
                sender=r.sender,
                data=bytes(r.data),
                received_at=r.received_at,
                sender_pid=r.sender_pid,
                id=r.id,
            )
            for r in rows
        ]

    async def pending_count(self) -> int:
        return int(
            await self._scalar(
                select(func.count()).select_from(pending), "counting pending envelopes"
            )
        )

    async def history(
        self, cid: str, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[StoredEnvelope]:
        stmt = select(*_ENVELOPE_COLUMNS).where(envelopes.c.cid == cid).limit(limit)
        if after is not None:
            stmt = stmt.where(envelopes.c.seq > after).order_by(envelopes.c.seq)
        else:
            if before is not None:
                stmt = stmt.where(envelopes.c.seq < before)
            stmt = stmt.order_by(envelopes.c.seq.desc())
        return [_envelope(r) for r in await self._rows(stmt, "reading history")]

    async def since(
        self, after: int, *, cids: Collection[str] | None = None, limit: int = 1000
    ) -> list[StoredEnvelope]:
        stmt = (
            select(*_ENVELOPE_COLUMNS)
            .where(envelopes.c.seq > after)
            .order_by(envelopes.c.seq)
            .limit(limit)
        )
        if cids is not None:
            stmt = stmt.where(envelopes.c.cid.in_(list(cids)))
        return [_envelope(r) for r in await self._rows(stmt, "reading new envelopes")]

    async def history_keys(self, cid: str, *, after: int, limit: int) -> list[EnvelopeKey]:
        stmt = (
            select(
                envelopes.c.seq,
                envelopes.c.epoch,
                envelopes.c.sender,
                envelopes.c.chain,
                envelopes.c.step,
            )
            .where(envelopes.c.cid == cid, envelopes.c.seq > after)
            .order_by(envelopes.c.seq)
            .limit(limit)
        )
        return [EnvelopeKey(*r) for r in await self._rows(stmt, "reading history")]

    async def history_rows(self, cid: str, seqs: Collection[int]) -> list[StoredEnvelope]:
        if not seqs:
            return []
        stmt = (
            select(*_ENVELOPE_COLUMNS)
            .where(envelopes.c.cid == cid, envelopes.c.seq.in_(list(seqs)))
            .order_by(envelopes.c.seq)
        )
        return [_envelope(r) for r in await self._rows(stmt, "reading history")]

    async def archived_digests(
        self, cid: str, chains: Sequence[ChainSteps]
    ) -> set[tuple[int, int, int, int, bytes]]:
        # A signed row's digest column is empty (one per key): hash its bytes here. An
        # unsigned row's column is already candidate_digest(data), the same function.
        signed_data = case((envelopes.c.digest == SIGNED_DIGEST, envelopes.c.data), else_=None)
        found: set[tuple[int, int, int, int, bytes]] = set()
        async with _mapped("checking the archive"), self.engine.connect() as conn:
            for epoch, sender, chain, steps in chains:
                if not steps:
                    continue
                rows = await conn.execute(
                    select(envelopes.c.step, envelopes.c.digest, signed_data.label("data")).where(
                        envelopes.c.cid == cid,
                        envelopes.c.epoch == epoch,
                        envelopes.c.sender == sender,
                        envelopes.c.chain == chain,
                        envelopes.c.step.in_(list(steps)),
                    )
                )
                for r in rows:
                    digest = bytes(r.digest) or candidate_digest(bytes(r.data))
                    found.add((epoch, sender, chain, int(r.step), digest))
        return found

    async def max_seq(self) -> int:
        return int(await self._scalar(select(func.max(envelopes.c.seq)), "reading seq") or 0)

    async def record_canary(self, nonce: bytes, seen_at: float) -> None:
        async with _mapped("noting a canary"), self._write_lock(), self.engine.begin() as conn:
            await conn.execute(
                delete(canaries).where(canaries.c.seen_at < seen_at - _CANARY_KEEP_S)
            )
            await conn.execute(
                self.dialect_insert(canaries).on_conflict_do_nothing(),
                {"nonce": nonce, "seen_at": seen_at},
            )

    async def canary_seen(self, nonce: bytes) -> bool:
        found = await self._scalar(
            select(canaries.c.seen_at).where(canaries.c.nonce == nonce), "looking for a canary"
        )
        return found is not None

    async def epoch_start(self, cid: str, epoch: int) -> int:
        first = await self._scalar(
            select(func.min(envelopes.c.seq)).where(
                envelopes.c.cid == cid, envelopes.c.epoch >= epoch
            ),
            "reading history",
        )
        if first is not None:
            return int(first) - 1
        last = await self._scalar(
            select(func.max(envelopes.c.seq)).where(envelopes.c.cid == cid), "reading history"
        )
        return int(last or 0)

    async def max_grant_seq(self) -> int:
        return int(await self._scalar(select(func.max(grants.c.seq)), "reading seq") or 0)

    async def grants_for(
        self, recipients: Collection[str], *, after: int = 0, limit: int = 100
    ) -> list[StoredGrant]:
        rows = await self._rows(
            select(grants.c.seq, grants.c.recipient, grants.c.cid, grants.c.granter, grants.c.data)
            .where(grants.c.recipient.in_(list(recipients)), grants.c.seq > after)
            .order_by(grants.c.seq)
            .limit(limit),
            "reading grants",
        )
        return [StoredGrant(r.seq, r.recipient, r.cid, r.granter, bytes(r.data)) for r in rows]

    async def conversations_of(self, pids: Collection[str]) -> dict[str, tuple[str, ...]]:
        if not pids:
            return {}
        head = and_(
            roster_members.c.cid == conv_heads.c.cid, roster_members.c.epoch == conv_heads.c.epoch
        )
        mine = (
            select(conv_heads.c.cid)
            .join(roster_members, head)
            .where(roster_members.c.pid.in_(list(pids)))
        )
        rows = await self._rows(
            select(conv_heads.c.cid, roster_members.c.pid)
            .join(roster_members, head)
            .where(conv_heads.c.cid.in_(mine))
            .order_by(conv_heads.c.cid, roster_members.c.pid),
            "reading conversations",
        )
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r.cid, []).append(r.pid)
        return {cid: tuple(members) for cid, members in out.items()}

    async def was_member(self, cid: str, pids: Collection[str]) -> bool:
        if not pids:
            return False
        if self._member_known(cid, pids):
            return True
        found = await self._scalar(
            select(roster_members.c.pid)
            .where(roster_members.c.cid == cid, roster_members.c.pid.in_(list(pids)))
            .limit(1),
            "checking membership",
        )
        if found is None:
            return False
        self._remember_member(cid, found)
        return True

    # -- accounts ----------------------------------------------------------------------

    async def create_account(self, username: str, password_hash: str, *, is_admin: bool) -> int:
        """Raises: NameTaken, StorageError."""
        try:
            async with (
                _mapped("creating an account"),
                self._write_lock(),
                self.engine.begin() as conn,
            ):
                result = await conn.execute(
                    accounts.insert().returning(accounts.c.id),
                    {
                        "username": username,
                        "password_hash": password_hash,
                        "is_admin": is_admin,
                        "created_at": time.time(),
                    },
                )
                return int(result.scalar_one())
        except StorageError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise NameTaken(f"user name {username!r} is taken") from None
            raise

    async def account_login(self, username: str) -> tuple[int, str] | None:
        rows = await self._rows(
            select(accounts.c.id, accounts.c.password_hash).where(accounts.c.username == username),
            "reading an account",
        )
        return (int(rows[0].id), str(rows[0].password_hash)) if rows else None

    async def set_password_hash(self, account_id: int, password_hash: str) -> None:
        async with _mapped("updating a password"), self._write_lock(), self.engine.begin() as conn:
            await conn.execute(
                update(accounts)
                .where(accounts.c.id == account_id)
                .values(password_hash=password_hash)
            )

    async def account(self, account_id: int) -> Account | None:
        rows = await self._rows(
            select(accounts.c.id, accounts.c.username, accounts.c.is_admin).where(
                accounts.c.id == account_id
            ),
            "reading an account",
        )
        if not rows:
            return None
        owned = await self._rows(
            select(participants.c.pid, participants.c.verified)
            .where(participants.c.account_id == account_id)
            .order_by(participants.c.pid),
            "reading participants",
        )
        row = rows[0]
        return Account(
            int(row.id),
            row.username,
            bool(row.is_admin),
            pids=tuple(p.pid for p in owned if p.verified),
            unverified=tuple(p.pid for p in owned if not p.verified),
        )

    async def add_participant(self, account_id: int, pid: str, bundle: bytes) -> None:
        """Own ``pid``, verified, and keep its bundle (so its envelopes verify at once).
        Call it only after the account proved it holds the pid's key: an unverified
        claim by another account (schema 1, no proof) is taken over.

        Raises:
            NameTaken: another account proved it holds ``pid``.
            StorageError: the database failed.
        """
        created_at = Bundle.from_bytes(bundle).created_at
        try:
            async with (
                _mapped("adding a participant"),
                self._write_lock(),
                self.engine.begin() as conn,
            ):
                found = (
                    await conn.execute(
                        select(participants.c.account_id, participants.c.verified).where(
                            participants.c.pid == pid
                        )
                    )
                ).first()
                if found is not None and found.account_id != account_id and found.verified:
                    raise NameTaken(f"participant {pid} belongs to another account")
                if found is None:
                    await conn.execute(
                        participants.insert(),
                        {"pid": pid, "account_id": account_id, "verified": True},
                    )
                else:
                    await conn.execute(
                        update(participants)
                        .where(participants.c.pid == pid)
                        .values(account_id=account_id, verified=True)
                    )
                stmt = self.dialect_insert(bundles)
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[bundles.c.pid],
                        set_={"created_at": stmt.excluded.created_at, "data": stmt.excluded.data},
                        where=bundles.c.created_at < stmt.excluded.created_at,
                    ),
                    {"pid": pid, "created_at": created_at, "data": bundle},
                )
        except StorageError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise NameTaken(f"participant {pid} belongs to another account") from None
            raise

    async def add_challenge(
        self, digest: bytes, account_id: int, expires_at: float, *, now: float, keep: int
    ) -> None:
        async with _mapped("storing a challenge"), self._write_lock(), self.engine.begin() as conn:
            await conn.execute(delete(claim_challenges).where(claim_challenges.c.expires_at <= now))
            older = (
                select(claim_challenges.c.digest)
                .where(claim_challenges.c.account_id == account_id)
                .order_by(claim_challenges.c.expires_at.desc())
                .offset(max(keep - 1, 0))
            )
            await conn.execute(delete(claim_challenges).where(claim_challenges.c.digest.in_(older)))
            await conn.execute(
                claim_challenges.insert(),
                {"digest": digest, "account_id": account_id, "expires_at": expires_at},
            )

    async def take_challenge(self, digest: bytes, account_id: int, now: float) -> bool:
        async with _mapped("taking a challenge"), self._write_lock(), self.engine.begin() as conn:
            result = await conn.execute(
                delete(claim_challenges)
                .where(
                    claim_challenges.c.digest == digest,
                    claim_challenges.c.account_id == account_id,
                    claim_challenges.c.expires_at > now,
                )
                .returning(claim_challenges.c.digest)
            )
            return result.first() is not None

    def _nonce_connection(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self.engine.begin()

    async def remember_nonce(self, pid: str, nonce: str, expires_at: float, now: float) -> bool:
        # One statement: a new (pid, nonce) is inserted, an expired one renewed; a live
        # one is left alone and returns no row. Atomic on both engines, so two gateways
        # receiving the same request at once accept it once.
        stmt = self.dialect_insert(request_nonces)
        async with (
            _mapped("recording a nonce"),
            self._write_lock(),
            self._nonce_connection() as conn,
        ):
            result = await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[request_nonces.c.pid, request_nonces.c.nonce],
                    set_={"expires_at": stmt.excluded.expires_at},
                    where=request_nonces.c.expires_at <= now,
                ).returning(request_nonces.c.pid),
                {"pid": pid, "nonce": nonce, "expires_at": expires_at},
            )
            return result.first() is not None

    async def purge_nonces(self, now: float) -> int:
        async with _mapped("purging nonces"), self._write_lock(), self.engine.begin() as conn:
            result = await conn.execute(
                delete(request_nonces).where(request_nonces.c.expires_at <= now)
            )
            return int(result.rowcount or 0)

    async def secret(self, name: str, candidate: bytes) -> bytes:
        async with _mapped("reading a secret"), self._write_lock(), self.engine.begin() as conn:
            await conn.execute(
                self.dialect_insert(gateway_secrets).on_conflict_do_nothing(),
                {"name": name, "value": candidate},
            )
            value = (
                await conn.execute(
                    select(gateway_secrets.c.value).where(gateway_secrets.c.name == name)
                )
            ).scalar_one()
            return bytes(value)

    async def create_session(self, token_hash: bytes, account_id: int, expires_at: float) -> None:
        async with _mapped("creating a session"), self._write_lock(), self.engine.begin() as conn:
            await conn.execute(delete(sessions).where(sessions.c.expires_at < time.time()))
            await conn.execute(
                sessions.insert(),
                {"token_hash": token_hash, "account_id": account_id, "expires_at": expires_at},
            )

    async def session_account(self, token_hash: bytes, now: float) -> Account | None:
        account_id = await self._scalar(
            select(sessions.c.account_id).where(
                sessions.c.token_hash == token_hash, sessions.c.expires_at > now
            ),
            "reading a session",
        )
        return await self.account(int(account_id)) if account_id is not None else None

    async def delete_session(self, token_hash: bytes) -> None:
        async with _mapped("deleting a session"), self._write_lock(), self.engine.begin() as conn:
            await conn.execute(delete(sessions).where(sessions.c.token_hash == token_hash))

    async def list_accounts(self) -> list[Account]:
        rows = await self._rows(
            select(accounts.c.id, accounts.c.username, accounts.c.is_admin).order_by(accounts.c.id),
            "listing accounts",
        )
        return [Account(int(r.id), r.username, bool(r.is_admin)) for r in rows]


class SqliteStore(SqlStore):
    """The embedded default: one SQLite file in WAL mode."""

    dialect_insert = staticmethod(sqlite_dialect.insert)

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._lock = asyncio.Lock()
        self._reader_conn: sqlite3.Connection | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fc-sqlite-archive")

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:  # noqa: ANN401
            cursor = dbapi_conn.cursor()
            # WAL: readers never block the archiver; NORMAL is durable at each WAL
            # checkpoint and loses nothing on a process crash (only on power loss).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    @classmethod
    def from_path(cls, path: str) -> SqliteStore:
        return cls(create_async_engine(f"sqlite+aiosqlite:///{path}"))

    # -- hot reads on the driver, on the event loop -------------------------------------
    # A history page, a membership check and the live feed's "what is new" are the
    # reads browsers and devices cause most. Each is an indexed range of at most
    # MAX_PAGE (history) or 1,000 (feed) rows from a memory-mapped file: ≈ 0.1-0.5 ms.
    # They run on a plain sqlite3 connection (query-only) right here, on the loop.
    # Through a thread they cost two wake-ups, and on a busy machine each wake-up waits
    # for a time slice: measured on 2 shared cores at load 4-5, a page read through a
    # reader thread had a p99 of 5.2-5.3 ms, inline 0.4-0.6 ms (median 0.27 vs 0.11).
    # Through SQLAlchemy and aiosqlite it was four hops (checkout, execute, fetch, reset).
    # Writes stay in worker threads (a commit may wait for a checkpoint or a lock).

    def _reader(self) -> sqlite3.Connection:
        conn = self._reader_conn
        if conn is None:
            path = self.engine.url.database
            if not path:
                raise StorageError("no SQLite file to read")
            conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA mmap_size=268435456")  # 256 MiB: page reads without syscalls
            conn.execute("PRAGMA cache_size=-16384")  # 16 MiB of page cache
            self._reader_conn = conn
        return conn

    def _read(self, sql: str, params: Sequence[Any], what: str) -> list[Any]:
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"database error while {what}: {type(exc).__name__}") from exc

    async def history(
        self, cid: str, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[StoredEnvelope]:
        params: tuple[Any, ...]
        if after is not None:
            sql, params = _HISTORY_AFTER, (cid, after, limit)
        elif before is not None:
            sql, params = _HISTORY_BEFORE, (cid, before, limit)
        else:
            sql, params = _HISTORY_NEWEST, (cid, limit)
        return [StoredEnvelope(*row) for row in self._read(sql, params, "reading history")]

    async def history_keys(self, cid: str, *, after: int, limit: int) -> list[EnvelopeKey]:
        rows = self._read(_HISTORY_KEYS, (cid, after, limit), "reading history")
        return [EnvelopeKey(*row) for row in rows]

    async def history_rows(self, cid: str, seqs: Collection[int]) -> list[StoredEnvelope]:
        wanted = list(seqs)
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))  # placeholders only: values are bound
        sql = f"{_HISTORY_COLUMNS} WHERE cid = ? AND seq IN ({marks}) ORDER BY seq"
        rows = self._read(sql, (cid, *wanted), "reading history")
        return [StoredEnvelope(*row) for row in rows]

    async def since(
        self, after: int, *, cids: Collection[str] | None = None, limit: int = 1000
    ) -> list[StoredEnvelope]:
        if cids is None:
            rows = self._read(_SINCE, (after, limit), "reading new envelopes")
        else:
            wanted = list(cids)
            if not wanted:
                return []
            marks = ",".join("?" * len(wanted))  # placeholders only: values are bound
            sql = f"{_HISTORY_COLUMNS} WHERE seq > ? AND cid IN ({marks}) ORDER BY seq LIMIT ?"
            rows = self._read(sql, (after, *wanted, limit), "reading new envelopes")
        return [StoredEnvelope(*row) for row in rows]

    async def was_member(self, cid: str, pids: Collection[str]) -> bool:
        if not pids:
            return False
        if self._member_known(cid, pids):
            return True
        wanted = list(pids)
        marks = ",".join("?" * len(wanted))  # placeholders only: values are bound
        sql = f"SELECT pid FROM roster_members WHERE cid = ? AND pid IN ({marks}) LIMIT 1"  # noqa: S608
        rows = self._read(sql, (cid, *wanted), "checking membership")
        if not rows:
            return False
        self._remember_member(cid, rows[0][0])
        return True

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        for conn in (self._reader_conn, self._writer_conn):
            if conn is not None:
                conn.close()
        self._reader_conn = self._writer_conn = None
        await super().close()

    # -- the archive's hot write: one thread hop per batch --------------------------------
    # A batch of envelopes alone (what a live stream is made of) is one transaction on
    # a plain sqlite3 connection in one worker thread: BEGIN, one executemany of plain
    # tuples, COMMIT. Through SQLAlchemy and aiosqlite the same commit was ≈ 8 thread
    # hops (begin, each statement, fetch, commit) and a dict plus bound-parameter
    # processing per row on the event loop. Mixed batches (rosters, bundles, grants,
    # pending) keep the general path.

    def _archive_connection(self) -> sqlite3.Connection:
        conn = self._writer_conn
        if conn is None:
            path = self.engine.url.database
            if not path:
                raise StorageError("no SQLite file to write")
            conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")  # as the engine's connections (above)
            conn.execute("PRAGMA foreign_keys=ON")
            self._writer_conn = conn
        return conn

    def _insert_batch(self, batch: list[NewEnvelope]) -> tuple[int, int | None]:
        """In the writer thread: insert idempotently; (new rows, largest new seq)."""
        rows = _envelope_rows(batch)  # here, not on the event loop
        conn = self._archive_connection()
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT_ENVELOPE, rows)
            archived = conn.total_changes - before
            # One writer (BEGIN IMMEDIATE, and our lock): the new rows are the newest,
            # and AUTOINCREMENT never reuses a number.
            top = conn.execute("SELECT max(seq) FROM envelopes").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return archived, (int(top) if archived else None)

    async def commit(self, batch: ArchiveBatch) -> ArchiveResult:
        """See ``HistoryStore.commit``; envelope-only batches take the fast path above.

        Raises:
            StorageError: nothing was written.
        """
        others = (
            batch.pending
            or batch.resolved
            or batch.rosters
            or batch.bundles
            or batch.grants
            or batch.held
            or batch.released
        )
        if not batch.envelopes or others:
            return await super().commit(batch)
        rows = batch.envelopes
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                archived, max_seq = await loop.run_in_executor(
                    self._writer, self._insert_batch, rows
                )
            except sqlite3.Error as exc:
                raise StorageError(f"database error while archiving: {type(exc).__name__}") from exc
        return ArchiveResult(
            archived=archived,
            duplicates=len(rows) - archived,
            rosters=0,
            grants=0,
            max_seq=max_seq,
        )

    def _write_lock(self) -> AbstractAsyncContextManager[None]:
        return self._lock

    # A nonce per signed request: one statement on the archive's plain connection in its
    # writer thread (autocommit), one thread hop. Through SQLAlchemy and aiosqlite it was
    # ≈ 0.5 ms a request with a p99 of ≈ 3.7 ms (2 shared cores).

    def _remember(self, pid: str, nonce: str, expires_at: float, now: float) -> bool:
        conn = self._archive_connection()
        before = conn.total_changes
        conn.execute(_REMEMBER_NONCE, (pid, nonce, expires_at, now))
        return conn.total_changes > before

    async def remember_nonce(self, pid: str, nonce: str, expires_at: float, now: float) -> bool:
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                return await loop.run_in_executor(
                    self._writer, self._remember, pid, nonce, expires_at, now
                )
            except sqlite3.Error as exc:
                raise StorageError(
                    f"database error while recording a nonce: {type(exc).__name__}"
                ) from exc


class PostgresStore(SqlStore):
    """PostgreSQL through asyncpg; several gateways may share one database."""

    dialect_insert = staticmethod(pg_dialect.insert)

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._nonces: AsyncEngine | None = None

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10) -> PostgresStore:
        return cls(create_async_engine(url, pool_size=pool_size, pool_pre_ping=True))

    async def _serialise_archive(self, conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ARCHIVE_LOCK})

    async def _migration_lock(self, conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})

    # A nonce per signed request, on an engine of its own: one statement in autocommit,
    # without waiting for the WAL flush, on connections not pinged at checkout. Through
    # the main engine (ping, BEGIN, INSERT, COMMIT with its flush) the check took a median
    # ≈ 1 ms a request, p99 ≈ 10 ms on 2 shared cores; this way ≈ 0.4 ms, p99 ≈ 1 ms
    # (a bare asyncpg statement: 0.15 ms). A crash of PostgreSQL forgets at most the
    # last ≈ 0.6 s of nonces (three times wal_writer_delay): a request recorded just then
    # could be replayed once, inside its window.

    def _nonce_connection(self) -> AbstractAsyncContextManager[AsyncConnection]:
        if self._nonces is None:
            self._nonces = create_async_engine(
                self.engine.url,
                pool_size=2,
                isolation_level="AUTOCOMMIT",
                pool_reset_on_return=None,  # autocommit: no transaction to end
                connect_args={"server_settings": {"synchronous_commit": "off"}},
            )
        return self._nonces.connect()

    async def close(self) -> None:
        if self._nonces is not None:
            await self._nonces.dispose()
            self._nonces = None
        await super().close()


def open_store(url: str) -> SqliteStore | PostgresStore:
    """The store for a ``sqlite:///path`` or ``postgresql://…`` URL (not yet migrated).

    Raises:
        ConfigError: another scheme.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path:
            raise ConfigError("sqlite URL needs a file path: sqlite:///path/to/history.db")
        return SqliteStore.from_path(path)
    if scheme in ("postgresql", "postgres"):
        rest = url.split("://", 1)[1]
        return PostgresStore.from_url(f"postgresql+asyncpg://{rest}")
    raise ConfigError(f"unsupported database URL scheme {parts.scheme!r}")
