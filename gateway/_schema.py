"""Tables of the history and account database, and their migrations.

Migrations are numbered steps run in order inside one transaction each; the applied
version is kept in ``fieldchat_schema``. They are written with SQLAlchemy Core so one
list serves SQLite and PostgreSQL; a step that needs engine-specific SQL checks
``conn.dialect.name``. Add a step, never edit an applied one.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

__all__ = [
    "MIGRATIONS",
    "accounts",
    "bundles",
    "conv_heads",
    "envelopes",
    "grants",
    "metadata",
    "participants",
    "pending",
    "roster_members",
    "rosters",
    "schema_version",
    "sessions",
]

# SQLite only makes INTEGER PRIMARY KEY a rowid alias (and autoincrement).
SeqType = BigInteger().with_variant(Integer, "sqlite")
Id = String(26)

metadata = MetaData()

schema_version = Table("fieldchat_schema", metadata, Column("version", Integer, nullable=False))

envelopes = Table(
    "envelopes",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("cid", Id, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("sender", BigInteger, nullable=False),
    Column("sender_pid", Id, nullable=False),
    Column("chain", BigInteger, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("received_at", Float, nullable=False),
    UniqueConstraint("cid", "epoch", "sender", "chain", "step", name="envelopes_dedupe"),
    Index("envelopes_cid_seq", "cid", "seq"),
    sqlite_autoincrement=True,
)

pending = Table(
    "pending",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("cid", Id, nullable=False, index=True),
    Column("epoch", BigInteger, nullable=False),
    Column("sender", BigInteger, nullable=False),
    Column("sender_pid", Id, nullable=True, index=True),
    Column("data", LargeBinary, nullable=False),
    Column("received_at", Float, nullable=False),
)

rosters = Table(
    "rosters",
    metadata,
    Column("cid", Id, primary_key=True),
    Column("epoch", BigInteger, primary_key=True),
    Column("digest", LargeBinary, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

roster_members = Table(
    "roster_members",
    metadata,
    Column("cid", Id, primary_key=True),
    Column("epoch", BigInteger, primary_key=True),
    Column("pid", Id, primary_key=True),
    Index("roster_members_pid", "pid"),
)

conv_heads = Table(
    "conv_heads",
    metadata,
    Column("cid", Id, primary_key=True),
    Column("epoch", BigInteger, nullable=False),
)

bundles = Table(
    "bundles",
    metadata,
    Column("pid", Id, primary_key=True),
    Column("created_at", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

grants = Table(
    "grants",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("recipient", Id, nullable=False),
    Column("cid", Id, nullable=False),
    Column("granter", Id, nullable=False),
    Column("digest", LargeBinary, nullable=False, unique=True),
    Column("data", LargeBinary, nullable=False),
    Column("received_at", Float, nullable=False),
    Index("grants_recipient_seq", "recipient", "seq"),
    sqlite_autoincrement=True,
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

participants = Table(
    "participants",
    metadata,
    Column("pid", Id, primary_key=True),
    Column("account_id", ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True),
)

sessions = Table(
    "sessions",
    metadata,
    Column("token_hash", LargeBinary, primary_key=True),
    Column("account_id", ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t is not schema_version])


# (version, what it does, step). Each runs in its own transaction with the version bump.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial tables", _v1_initial),
]
