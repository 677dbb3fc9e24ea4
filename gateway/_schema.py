"""Tables of the history and account database, and their migrations.

Migrations are numbered steps run in order inside one transaction each; the applied
version is kept in ``fieldchat_schema``. They are written with SQLAlchemy Core so one
list serves SQLite and PostgreSQL; a step that needs engine-specific SQL checks
``conn.dialect.name``. Add a step, never edit an applied one.
"""

from __future__ import annotations

import hashlib
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

from fieldchat.schemas.envelope import FLAG_SIGNED

__all__ = [
    "MIGRATIONS",
    "SIGNED_DIGEST",
    "accounts",
    "bundles",
    "canaries",
    "candidate_digest",
    "claim_challenges",
    "conv_heads",
    "envelopes",
    "gateway_secrets",
    "grants",
    "held_rosters",
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

# An envelope's key is (cid, epoch, sender, chain, step). A signed envelope proves its
# sender, so the first one that verifies is the only one kept for its key. An unsigned
# one proves nothing to the gateway: a member can publish junk under another member's
# key first. So every distinct unsigned candidate is kept, and receivers (who can
# authenticate with AES-GCM) pick. One unique index does both: ``digest`` is empty for
# a signed envelope (one row per key) and ``candidate_digest(data)`` for an unsigned
# one (one row per key and bytes), so neither kind can block the other. A redelivery
# or a second gateway inserts nothing. (Two partial indexes on a ``signed`` column
# said the same and cost a SQLite insert ≈ 0.3 µs more: both WHERE clauses are
# evaluated for every row.)
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
    Column("digest", LargeBinary, nullable=False),  # b"" signed, else candidate_digest
    Index("envelopes_cid_seq", "cid", "seq"),
    Index("envelopes_candidate", "cid", "epoch", "sender", "chain", "step", "digest", unique=True),
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
    # Who signed it and when it was archived (NULL for rosters archived before v3):
    # conversations founded per signer are counted from these (founding quota).
    Column("signer", Id, nullable=True),
    Column("archived_at", Float, nullable=True),
    Index("rosters_signer", "signer", "archived_at"),
)

# Rosters that do not chain to an archived roster yet (their previous epoch has not
# arrived): kept, bounded, until it does (then adopted) or ``pending_ttl_s`` passes.
held_rosters = Table(
    "held_rosters",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("cid", Id, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("source", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    UniqueConstraint("cid", "epoch", "digest", name="held_rosters_once"),
    sqlite_autoincrement=True,
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

# Routing canaries (gateway._routing): the gateway that receives one through the
# shared subscription notes it here, and the one that sent it looks. Rows live minutes.
canaries = Table(
    "canaries",
    metadata,
    Column("nonce", LargeBinary, primary_key=True),
    Column("seen_at", Float, nullable=False, index=True),
)

# Keys every gateway on this database shares (the device-cookie MAC key), made once.
gateway_secrets = Table(
    "gateway_secrets",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)
CANDIDATE_DIGEST_BYTES = 16  # SHA-256, truncated: it only tells distinct bytes apart


def candidate_digest(data: bytes) -> bytes:
    """What tells two unsigned candidates of one key apart (``envelopes.digest``).

    128 bits: a collision would need a second preimage of bytes nobody has seen yet
    (the genuine envelope is published after the junk), not a birthday pair.
    """
    return hashlib.sha256(data).digest()[:CANDIDATE_DIGEST_BYTES]


SIGNED_DIGEST = b""  # ``envelopes.digest`` of a signed envelope: one per key


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


_V3_COPY_PAGE = 2000  # rows per round trip while digests are computed for old rows


def _v3_candidates(conn: Connection) -> None:
    """Unsigned candidates per key, signers of rosters, held rosters (issue 13).

    ``_v1_initial`` creates the tables as they are now, so on a fresh database every
    part of this step finds its work done and skips it; it changes only databases
    made before it.
    """
    found = inspect(conn)
    if "digest" not in {c["name"] for c in found.get_columns("envelopes")}:
        if conn.dialect.name == "sqlite":
            _v3_envelopes_sqlite(conn)
        else:
            _v3_envelopes_postgres(conn)
    if "signer" not in {c["name"] for c in found.get_columns("rosters")}:
        conn.execute(text("ALTER TABLE rosters ADD COLUMN signer VARCHAR(26)"))
        conn.execute(text("ALTER TABLE rosters ADD COLUMN archived_at FLOAT"))
        for index in rosters.indexes:
            index.create(conn)
    held_rosters.create(conn, checkfirst=True)


def _v3_envelopes_postgres(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE envelopes DROP CONSTRAINT IF EXISTS envelopes_dedupe"))
    conn.execute(text("ALTER TABLE envelopes ADD COLUMN digest BYTEA NOT NULL DEFAULT ''"))
    conn.execute(text("ALTER TABLE envelopes ALTER COLUMN digest DROP DEFAULT"))
    # The flags byte follows the version byte (PROTOCOL.md §3); FLAG_SIGNED is its top bit.
    conn.execute(
        text(
            f"UPDATE envelopes SET digest = substring(sha256(data) from 1 for "  # noqa: S608
            f"{CANDIDATE_DIGEST_BYTES}) WHERE (get_byte(data, 1) & {FLAG_SIGNED}) = 0"
        )
    )
    for index in envelopes.indexes:
        if index.name != "envelopes_cid_seq":
            index.create(conn)


def _v3_envelopes_sqlite(conn: Connection) -> None:
    """SQLite cannot drop a table's UNIQUE constraint: copy the rows into the new table,
    ``seq`` kept (it is every client's cursor), and the AUTOINCREMENT counter with them."""
    top = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'envelopes'")).scalar()
    conn.execute(text("DROP INDEX envelopes_cid_seq"))
    conn.execute(text("ALTER TABLE envelopes RENAME TO envelopes_v1"))
    envelopes.create(conn)
    columns = "seq, cid, epoch, sender, sender_pid, chain, step, data, received_at"
    after = -1
    while True:
        rows = conn.execute(
            text(
                f"SELECT {columns} FROM envelopes_v1 WHERE seq > :after "  # noqa: S608 - constant
                "ORDER BY seq LIMIT :n"
            ),
            {"after": after, "n": _V3_COPY_PAGE},
        ).all()
        if not rows:
            break
        conn.execute(
            envelopes.insert(),
            [
                {
                    **row._asdict(),
                    "digest": SIGNED_DIGEST  # the flags byte (PROTOCOL.md §3)
                    if row.data[1] & FLAG_SIGNED
                    else candidate_digest(row.data),
                }
                for row in rows
            ],
        )
        after = rows[-1].seq
    conn.execute(text("DROP TABLE envelopes_v1"))
    if top is not None:
        conn.execute(
            text("UPDATE sqlite_sequence SET seq = max(seq, :top) WHERE name = 'envelopes'"),
            {"top": top},
        )


def _v4_canaries(conn: Connection) -> None:
    """The table of routing canaries (issue 14); ``_v1_initial`` made it on a fresh database."""
    canaries.create(conn, checkfirst=True)


# (version, what it does, step). Each runs in its own transaction with the version bump.
# Version 2 belongs to the account tables (issue 13, another branch); 3 runs after it.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial tables", _v1_initial),
    (2, "proof of possession: verified participants, claim challenges, request nonces", _v2_claims),
    (3, "unsigned envelope candidates, roster signers, held rosters", _v3_candidates),
    (4, "routing canaries", _v4_canaries),
]
