"""The history and account store: SQLite (WAL) and PostgreSQL behind one class.

:class:`SqlStore` implements :class:`~gateway._store.HistoryStore` and
:class:`~gateway._store.AccountStore` by handing each call's query function
(``gateway/_sql_archive.py``, ``_sql_history.py``, ``_sql_accounts.py``: each written
once, for both engines) to its :class:`~gateway._db.Database`, the one way into the
database, which runs it off the event loop on SQLite. What is left here is what is
neither SQL nor a connection: the membership cache and the mapping of a unique-key
violation to :class:`NameTaken`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from urllib.parse import urlsplit

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from fieldchat.gateway import _sql_accounts as accounts
from fieldchat.gateway import _sql_archive as archive
from fieldchat.gateway import _sql_history as history
from fieldchat.gateway._db import Database, PostgresDatabase, SqliteDatabase
from fieldchat.gateway._errors import NameTaken, StorageError
from fieldchat.gateway._store import (
    Account,
    ArchiveBatch,
    ArchiveResult,
    ChainSteps,
    EnvelopeKey,
    HeldRoster,
    PendingEnvelope,
    RosterRecord,
    StoredEnvelope,
    StoredGrant,
)
from fieldchat.schemas import Bundle
from fieldchat.schemas.errors import ConfigError

__all__ = ["PostgresStore", "SqlStore", "SqliteStore", "open_store"]

MEMBER_CACHE_MAX = 100_000


class SqlStore:
    """The store over a :class:`Database`; use :func:`open_store` or a subclass."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # (cid, pid) pairs known to be members. Rosters are append-only (never deleted),
        # so "some archived roster of cid lists pid" never becomes false: positive
        # answers are cached (bounded), negative ones are always asked again.
        self._members: OrderedDict[tuple[str, str], None] = OrderedDict()

    # -- lifecycle ---------------------------------------------------------------------

    async def migrate(self) -> int:
        """Apply the missing migrations in order; return the schema version.

        Raises:
            StorageError: the database failed.
        """
        return await self.db.write("migrating", archive.migrate)

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        await self.db.read("pinging", _select_one)

    # -- archive -----------------------------------------------------------------------

    async def commit(self, batch: ArchiveBatch) -> ArchiveResult:
        """Write one archive batch in one transaction (see ``HistoryStore.commit``).

        Raises:
            StorageError: nothing was written.
        """
        return await self.db.write("archiving", archive.commit_batch, batch)

    async def record_canary(self, nonce: bytes, seen_at: float) -> None:
        await self.db.write("noting a canary", archive.record_canary, nonce, seen_at)

    # -- reads -------------------------------------------------------------------------

    async def history(
        self, cid: str, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[StoredEnvelope]:
        return await self.db.read("reading history", history.history, cid, before, after, limit)

    async def since(
        self, after: int, *, cids: Collection[str] | None = None, limit: int = 1000
    ) -> list[StoredEnvelope]:
        if cids is not None and not cids:
            return []
        return await self.db.read("reading new envelopes", history.since, after, cids, limit)

    async def history_keys(self, cid: str, *, after: int, limit: int) -> list[EnvelopeKey]:
        return await self.db.read("reading history", history.history_keys, cid, after, limit)

    async def history_rows(self, cid: str, seqs: Collection[int]) -> list[StoredEnvelope]:
        if not seqs:
            return []
        return await self.db.read("reading history", history.history_rows, cid, seqs)

    async def archived_digests(
        self, cid: str, chains: Sequence[ChainSteps]
    ) -> set[tuple[int, int, int, int, bytes]]:
        return await self.db.read("checking the archive", history.archived_digests, cid, chains)

    async def max_seq(self) -> int:
        return await self.db.read("reading seq", history.max_seq)

    async def epoch_start(self, cid: str, epoch: int) -> int:
        return await self.db.read("reading history", history.epoch_start, cid, epoch)

    async def roster(self, cid: str, epoch: int) -> bytes | None:
        return await self.db.read("reading a roster", history.roster, cid, epoch)

    async def rosters(self, cid: str) -> list[RosterRecord]:
        return await self.db.read("reading rosters", history.rosters_of, cid)

    async def roster_head(self, cid: str) -> tuple[int, bytes] | None:
        return await self.db.read("reading a roster", history.roster_head, cid)

    async def foundings(self, signer: str, *, since: float) -> int:
        return await self.db.read("counting foundings", history.foundings, signer, since)

    async def held_rosters(
        self, *, cids: Collection[str] = (), limit: int = 1000
    ) -> list[HeldRoster]:
        return await self.db.read("reading held rosters", history.held_rosters_of, cids, limit)

    async def held_counts(self, cid: str) -> tuple[int, int]:
        return await self.db.read("counting held rosters", history.held_counts, cid)

    async def bundle(self, pid: str) -> bytes | None:
        return await self.db.read("reading a bundle", history.bundle, pid)

    async def pending(
        self, *, cids: Collection[str] = (), pids: Collection[str] = (), limit: int = 1000
    ) -> list[PendingEnvelope]:
        return await self.db.read(
            "reading pending envelopes", history.pending_of, cids, pids, limit
        )

    async def pending_counts(self, cid: str) -> dict[tuple[int, int], int]:
        return await self.db.read("counting pending envelopes", history.pending_counts, cid)

    async def pending_count(self) -> int:
        return await self.db.read("counting pending envelopes", history.pending_count)

    async def max_grant_seq(self) -> int:
        return await self.db.read("reading seq", history.max_grant_seq)

    async def grants_for(
        self, recipients: Collection[str], *, after: int = 0, limit: int = 100
    ) -> list[StoredGrant]:
        return await self.db.read("reading grants", history.grants_for, recipients, after, limit)

    async def conversations_of(self, pids: Collection[str]) -> dict[str, tuple[str, ...]]:
        if not pids:
            return {}
        return await self.db.read("reading conversations", history.conversations_of, pids)

    async def canary_seen(self, nonce: bytes) -> bool:
        return await self.db.read("looking for a canary", history.canary_seen, nonce)

    async def was_member(self, cid: str, pids: Collection[str]) -> bool:
        if not pids:
            return False
        for pid in pids:
            if (cid, pid) in self._members:
                self._members.move_to_end((cid, pid))
                return True
        found = await self.db.read("checking membership", history.member_of, cid, pids)
        if found is None:
            return False
        self._members[(cid, found)] = None
        while len(self._members) > MEMBER_CACHE_MAX:
            self._members.popitem(last=False)
        return True

    # -- accounts ----------------------------------------------------------------------

    async def create_account(self, username: str, password_hash: str, *, is_admin: bool) -> int:
        """Raises: NameTaken, StorageError."""
        try:
            return await self.db.write(
                "creating an account", accounts.create_account, username, password_hash, is_admin
            )
        except StorageError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise NameTaken(f"user name {username!r} is taken") from None
            raise

    async def account_login(self, username: str) -> tuple[int, str] | None:
        return await self.db.read("reading an account", accounts.account_login, username)

    async def set_password_hash(self, account_id: int, password_hash: str) -> None:
        await self.db.write(
            "updating a password", accounts.set_password_hash, account_id, password_hash
        )

    async def account(self, account_id: int) -> Account | None:
        return await self.db.read("reading an account", accounts.account, account_id)

    async def list_accounts(self) -> list[Account]:
        return await self.db.read("listing accounts", accounts.list_accounts)

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
            await self.db.write(
                "adding a participant",
                accounts.add_participant,
                account_id,
                pid,
                bundle,
                created_at,
            )
        except StorageError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise NameTaken(f"participant {pid} belongs to another account") from None
            raise

    async def create_session(self, token_hash: bytes, account_id: int, expires_at: float) -> None:
        await self.db.write(
            "creating a session", accounts.create_session, token_hash, account_id, expires_at
        )

    async def session_account(self, token_hash: bytes, now: float) -> Account | None:
        return await self.db.read("reading a session", accounts.session_account, token_hash, now)

    async def delete_session(self, token_hash: bytes) -> None:
        await self.db.write("deleting a session", accounts.delete_session, token_hash)

    async def add_challenge(
        self, digest: bytes, account_id: int, expires_at: float, *, now: float, keep: int
    ) -> None:
        await self.db.write(
            "storing a challenge",
            accounts.add_challenge,
            digest,
            account_id,
            expires_at,
            now,
            keep,
        )

    async def take_challenge(self, digest: bytes, account_id: int, now: float) -> bool:
        return await self.db.write(
            "taking a challenge", accounts.take_challenge, digest, account_id, now
        )

    async def remember_nonce(self, pid: str, nonce: str, expires_at: float, now: float) -> bool:
        return await self.db.write_unflushed(
            "recording a nonce", accounts.remember_nonce, pid, nonce, expires_at, now
        )

    async def purge_nonces(self, now: float) -> int:
        return await self.db.write("purging nonces", accounts.purge_nonces, now)

    async def secret(self, name: str, candidate: bytes) -> bytes:
        return await self.db.write("reading a secret", accounts.secret, name, candidate)


def _select_one(conn: Connection) -> None:
    conn.execute(text("SELECT 1"))


class SqliteStore(SqlStore):
    """The embedded default: one SQLite file in WAL mode, used from threads."""

    db: SqliteDatabase

    def __init__(self, db: SqliteDatabase) -> None:
        super().__init__(db)

    @classmethod
    def from_path(cls, path: str) -> SqliteStore:
        return cls(SqliteDatabase(path))


class PostgresStore(SqlStore):
    """PostgreSQL through asyncpg; several gateways may share one database."""

    db: PostgresDatabase

    def __init__(self, db: PostgresDatabase) -> None:
        super().__init__(db)

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10) -> PostgresStore:
        return cls(PostgresDatabase(url, pool_size=pool_size))


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
