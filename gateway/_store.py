"""The storage interfaces of the gateway and the records that cross them.

Two protocols, one implementation over both database engines (``fieldchat.gateway._sql``):

* :class:`HistoryStore` — ciphertext only: envelopes with their routing fields and a
  server sequence number (``seq``), envelopes waiting for a roster or bundle, rosters
  (and those waiting for their previous epoch), bundles and inbox grants.
* :class:`AccountStore` — web accounts, the participants they proved they hold,
  sessions, claim challenges, the nonces of signed requests and the shared secrets.

``seq`` is global and increases in commit order (PostgreSQL serialises archive
commits, SQLite has one writer), so "everything after cursor N" never skips a row
that commits later with a smaller number. It is the cursor of the history API and
of the WebSocket bridge.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

__all__ = [
    "Account",
    "AccountStore",
    "ArchiveBatch",
    "ArchiveResult",
    "ChainSteps",
    "EnvelopeKey",
    "GatewayStore",
    "GrantRecord",
    "HeldRoster",
    "HistoryStore",
    "NewEnvelope",
    "PendingEnvelope",
    "RosterRecord",
    "SecretStore",
    "StoredEnvelope",
    "StoredGrant",
]


@dataclass(frozen=True, slots=True)
class NewEnvelope:
    """A verified envelope to archive, verbatim, with its routing fields.

    ``signed``: its signature verified, so it is the only one kept for its key
    (cid, epoch, sender, chain, step). False: an unsigned candidate, kept next to any
    other distinct candidate of its key (see ``HistoryStore.commit``).
    """

    cid: str
    epoch: int
    sender: int
    sender_pid: str
    chain: int
    step: int
    data: bytes
    received_at: float
    signed: bool = True


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    seq: int
    cid: str
    epoch: int
    sender: int
    sender_pid: str
    chain: int
    step: int
    data: bytes


class EnvelopeKey(NamedTuple):
    """An archived envelope's cursor and key, without its bytes (what a tail that skips
    the steps its caller holds scans first)."""

    seq: int
    epoch: int
    sender: int
    chain: int
    step: int


class ChainSteps(NamedTuple):
    """Steps of one sending chain: ``(epoch, sender index, chain)`` and step numbers."""

    epoch: int
    sender: int
    chain: int
    steps: Collection[int]


@dataclass(frozen=True, slots=True)
class PendingEnvelope:
    """Structurally valid, not yet verifiable: its roster or its sender's bundle is missing.

    Stored (and acknowledged to the broker) so nothing valid is lost while it waits;
    ``id`` is ``None`` before it is stored.
    """

    cid: str
    epoch: int
    sender: int
    data: bytes
    received_at: float
    sender_pid: str | None = None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class RosterRecord:
    cid: str
    epoch: int
    digest: bytes
    members: tuple[str, ...]
    data: bytes
    signer: str | None = None  # stored when archived: foundings per signer are counted
    archived_at: float | None = None


@dataclass(frozen=True, slots=True)
class HeldRoster:
    """A signed roster whose previous epoch is not archived yet: it cannot be checked
    against the chain, so it waits (``source`` says where it came from: whether it is
    republished once adopted). ``id`` is ``None`` before it is stored."""

    cid: str
    epoch: int
    digest: bytes
    data: bytes
    source: str
    received_at: float
    id: int | None = None


@dataclass(frozen=True, slots=True)
class GrantRecord:
    recipient: str
    cid: str
    granter: str
    digest: bytes
    data: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class StoredGrant:
    seq: int
    recipient: str
    cid: str
    granter: str
    data: bytes


@dataclass(slots=True)
class ArchiveBatch:
    """Everything one archive commit writes, in one transaction.

    Rosters and bundles are written before envelopes; ``resolved`` are pending ids
    that this batch settles (archived or rejected) and deletes; ``released`` are held
    roster ids it settles (adopted, refused or expired) and deletes.
    """

    envelopes: list[NewEnvelope] = field(default_factory=list)
    pending: list[PendingEnvelope] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    rosters: list[RosterRecord] = field(default_factory=list)
    bundles: list[tuple[str, int, bytes]] = field(default_factory=list)  # pid, created_at, data
    grants: list[GrantRecord] = field(default_factory=list)
    held: list[HeldRoster] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.envelopes
            or self.pending
            or self.resolved
            or self.rosters
            or self.bundles
            or self.grants
            or self.held
            or self.released
        )


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    archived: int  # new envelope rows
    duplicates: int  # envelopes already archived (redelivery, a second gateway)
    rosters: int
    grants: int
    max_seq: int | None


@dataclass(frozen=True, slots=True)
class Account:
    """A web account. ``pids``: the participants it proved it holds, the only ones it
    may act and read for; ``unverified``: claimed before proofs existed (schema 2),
    no rights until proven."""

    id: int
    username: str
    is_admin: bool
    pids: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()


class SecretStore(Protocol):
    """Keys every gateway on one database shares, each made once."""

    async def secret(self, name: str, candidate: bytes) -> bytes:
        """The shared secret ``name``, set to ``candidate`` by whoever asks first."""
        ...


class HistoryStore(SecretStore, Protocol):
    """The encrypted history. Every method may raise :class:`~schemas.TransportError`
    (database unreachable); nothing here decrypts or sees keys."""

    async def migrate(self) -> int:
        """Bring the schema to the latest version; return it."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises TransportError when the database does not answer."""
        ...

    async def commit(self, batch: ArchiveBatch) -> ArchiveResult:
        """Write one archive batch atomically; envelopes idempotently: one signed
        envelope per key (the first), and every distinct unsigned candidate of a key
        (the same bytes once), none of which blocks the signed one."""
        ...

    async def roster(self, cid: str, epoch: int) -> bytes | None: ...

    async def rosters(self, cid: str) -> list[RosterRecord]: ...

    async def roster_head(self, cid: str) -> tuple[int, bytes] | None:
        """The newest archived roster of ``cid``: ``(epoch, bytes)``."""
        ...

    async def foundings(self, signer: str, *, since: float) -> int:
        """Epoch-0 rosters signed by ``signer`` archived at ``since`` or later."""
        ...

    async def held_rosters(
        self, *, cids: Collection[str] = (), limit: int = 1000
    ) -> list[HeldRoster]:
        """Held rosters of these conversations (all when empty), oldest first."""
        ...

    async def held_counts(self, cid: str) -> tuple[int, int]:
        """Held rosters: ``(of cid, in all)``."""
        ...

    async def pending_counts(self, cid: str) -> dict[tuple[int, int], int]:
        """Pending envelopes of ``cid`` by ``(epoch, sender index)``."""
        ...

    async def bundle(self, pid: str) -> bytes | None: ...

    async def pending(
        self, *, cids: Collection[str] = (), pids: Collection[str] = (), limit: int = 1000
    ) -> list[PendingEnvelope]:
        """Pending envelopes of these conversations or senders (all when both are empty)."""
        ...

    async def pending_count(self) -> int: ...

    async def history(
        self, cid: str, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[StoredEnvelope]:
        """Newest first below ``before``; or oldest first above ``after`` (gap filling)."""
        ...

    async def since(
        self, after: int, *, cids: Collection[str] | None = None, limit: int = 1000
    ) -> list[StoredEnvelope]:
        """Envelopes with ``seq > after`` in seq order, optionally of some conversations."""
        ...

    async def history_keys(self, cid: str, *, after: int, limit: int) -> list[EnvelopeKey]:
        """The keys of ``cid``'s envelopes with ``seq > after``, oldest first, no bytes."""
        ...

    async def history_rows(self, cid: str, seqs: Collection[int]) -> list[StoredEnvelope]:
        """The envelopes of ``cid`` with these ``seq``, oldest first."""
        ...

    async def archived_digests(
        self, cid: str, chains: Sequence[ChainSteps]
    ) -> set[tuple[int, int, int, int, bytes]]:
        """``(epoch, sender, chain, step, digest)`` of every archived envelope of these
        steps, ``digest`` the first 16 bytes of the SHA-256 of its bytes (each unsigned
        candidate of a key is its own entry)."""
        ...

    async def epoch_start(self, cid: str, epoch: int) -> int:
        """The cursor just before the first envelope of ``cid`` of ``epoch`` or later;
        after its last envelope when it has none of those (0 when it has none at all)."""
        ...

    async def max_seq(self) -> int: ...

    async def max_grant_seq(self) -> int: ...

    async def grants_for(
        self, recipients: Collection[str], *, after: int = 0, limit: int = 100
    ) -> list[StoredGrant]: ...

    async def conversations_of(self, pids: Collection[str]) -> dict[str, tuple[str, ...]]:
        """Conversations whose latest roster lists one of ``pids``: cid -> its members."""
        ...

    async def was_member(self, cid: str, pids: Collection[str]) -> bool:
        """True when any archived roster of ``cid`` lists one of ``pids``."""
        ...

    async def record_canary(self, nonce: bytes, seen_at: float) -> None:
        """Note that a routing canary arrived (any gateway may have sent it); forget
        those noted long ago."""
        ...

    async def canary_seen(self, nonce: bytes) -> bool:
        """True once some gateway on this database noted the canary ``nonce``."""
        ...


class AccountStore(SecretStore, Protocol):
    """Web accounts. Passwords arrive already hashed; session tokens as their SHA-256."""

    async def create_account(self, username: str, password_hash: str, *, is_admin: bool) -> int:
        """Raises: NameTaken: the user name exists."""
        ...

    async def account_login(self, username: str) -> tuple[int, str] | None:
        """``(account id, password hash)`` or ``None``."""
        ...

    async def set_password_hash(self, account_id: int, password_hash: str) -> None: ...

    async def account(self, account_id: int) -> Account | None: ...

    async def add_participant(self, account_id: int, pid: str, bundle: bytes) -> None:
        """Record ``pid`` as the account's, verified (call only after a proof of
        possession); an unverified claim of another account is taken over.

        Raises:
            NameTaken: another account proved it holds the pid.
        """
        ...

    async def add_challenge(
        self, digest: bytes, account_id: int, expires_at: float, *, now: float, keep: int
    ) -> None:
        """Store a claim challenge (its SHA-256); drop expired ones and the account's
        oldest beyond ``keep``."""
        ...

    async def take_challenge(self, digest: bytes, account_id: int, now: float) -> bool:
        """Consume the account's unexpired challenge: True once, False ever after."""
        ...

    async def remember_nonce(self, pid: str, nonce: str, expires_at: float, now: float) -> bool:
        """Record a signed request's nonce; False when ``(pid, nonce)`` is already
        recorded and not expired at ``now`` (a replay)."""
        ...

    async def purge_nonces(self, now: float) -> int:
        """Delete nonces expired at ``now``; return how many."""
        ...

    async def create_session(
        self, token_hash: bytes, account_id: int, expires_at: float
    ) -> None: ...

    async def session_account(self, token_hash: bytes, now: float) -> Account | None: ...

    async def delete_session(self, token_hash: bytes) -> None: ...

    async def list_accounts(self) -> Sequence[Account]: ...


class GatewayStore(HistoryStore, AccountStore, Protocol):
    """Both interfaces over one database (what ``create_app(store=…)`` takes)."""
