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
    false,
    inspect,
    text,
)

__all__ = [
    "MIGRATIONS",
    "accounts",
    "bundles",
    "claim_challenges",
    "conv_heads",
    "envelopes",
    "gateway_secrets",
    "grants",
    "metadata",
    "participants",
    "pending",
    "request_nonces",
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
    # True once the account proved it holds the pid's identity key (a signed claim
    # challenge); rows from before version 2 are False and give no rights until proven.
    Column("verified", Boolean, nullable=False, server_default=false()),
)

sessions = Table(
    "sessions",
    metadata,
    Column("token_hash", LargeBinary, primary_key=True),
    Column("account_id", ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("expires_at", Float, nullable=False),
)


# Single-use claim challenges (``POST /v1/me/participants/challenge``), by SHA-256.
claim_challenges = Table(
    "claim_challenges",
    metadata,
    Column("digest", LargeBinary, primary_key=True),
    Column("account_id", ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("expires_at", Float, nullable=False),
)

# Nonces of participant-signed requests seen inside the clock window, shared by every
# gateway on this database so a replay to another replica is refused too.
request_nonces = Table(
    "request_nonces",
    metadata,
    Column("pid", Id, primary_key=True),
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)

# Keys every gateway on this database shares (the device-cookie MAC key), made once.
gateway_secrets = Table(
    "gateway_secrets",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t is not schema_version])


def _v2_claims(conn: Connection) -> None:
    # Step 1 creates the tables of today's metadata, so on a fresh database the column
    # and the tables exist already: add only what is missing. Existing participant rows
    # get verified = false: they were claimed without proof (issue 13).
    columns = {c["name"] for c in inspect(conn).get_columns("participants")}
    if "verified" not in columns:
        default = "0" if conn.dialect.name == "sqlite" else "false"
        conn.execute(
            text(f"ALTER TABLE participants ADD COLUMN verified BOOLEAN NOT NULL DEFAULT {default}")
        )
    metadata.create_all(conn, tables=[claim_challenges, request_nonces, gateway_secrets])


# (version, what it does, step). Each runs in its own transaction with the version bump.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial tables", _v1_initial),
    (2, "proof of possession: verified participants, claim challenges, request nonces", _v2_claims),
]
