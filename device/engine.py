"""The end-to-end engine: conversations, rosters, grants, sealing and opening.

Pure: no network and no files except through the injected :class:`KeyStore`.
Methods return what must be published (:class:`Publication`) instead of sending it,
so the MQTT client, the gateway tests, the benchmarks and the vector generator all
drive the same code. Every rejection raises a :class:`~schemas.FieldchatError`
subclass and is counted in :attr:`Engine.counters` under its ``reason``; duplicates
return ``None`` and are counted as ``duplicate``. See PROTOCOL.md §5-§7.

Trust in rosters (§5.2): a roster is adopted only through a verified chain, from
epoch 0 when joining and from the newest adopted roster when catching up; one that
does not chain yet waits in a bounded pool (:class:`~schemas.errors.RosterPending`)
and nothing is granted before its chain is verified. Every roster of a conversation
is kept (each at most a few kilobytes); KEEP_EPOCHS bounds what opening needs.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple, ParamSpec, TypeVar

from fieldchat.device.chains import RecvChain, SendChain
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import SEND_CHAIN_PREFIX, KeyStore, MemoryKeyStore
from fieldchat.schemas import (
    Bundle,
    ChainGrant,
    Control,
    ControlOp,
    Grant,
    GrantMode,
    Member,
    Message,
    Policy,
    Receipt,
    Roster,
    Topics,
    cid_for,
    decode_id,
    decode_plaintext,
    encode_plaintext,
    verify_roster_chain,
)
from fieldchat.schemas._codec import fields, pack, unpack
from fieldchat.schemas._varint import encode as varint
from fieldchat.schemas.crypto import aead_seal, ed25519_verify, sha256
from fieldchat.schemas.envelope import (
    FLAG_COMPRESSED,
    FLAG_PADDED,
    FLAG_SIGNED,
    SIGNATURE_BYTES,
    VERSION,
    EnvelopeKind,
    read_header,
    step_bytes,
)
from fieldchat.schemas.errors import (
    ChainClosed,
    ChainEndUnknown,
    CryptoError,
    FieldchatError,
    GrantRejected,
    KeyStoreError,
    MissingKey,
    NotAMember,
    RosterPending,
    RosterRejected,
    SignatureRequired,
    StaleEpoch,
    UnknownConversation,
    UnknownParticipant,
    WireError,
)
from fieldchat.schemas.grant import ChainEnd
from fieldchat.schemas.messages import kind_of
from fieldchat.schemas.roster import is_roster

__all__ = [
    "KEEP_EPOCHS",
    "MAX_JOINING",
    "MAX_PENDING_GRANTS",
    "MAX_ROSTER_CANDIDATES",
    "BundleStatus",
    "BundleUpdate",
    "Engine",
    "GrantResult",
    "Opened",
    "Publication",
]

# Epochs whose envelopes are still opened (receiving chains, chain ends); rosters of
# older epochs are kept all the same: joiners and catching up need the whole chain.
KEEP_EPOCHS = 4
MAX_PENDING_GRANTS = 256  # grants held per conversation until its roster arrives
# Rosters held per conversation until the epochs between arrive (§5.2): the pool
# holds only those that overtook others (in-order ones are adopted at once); past
# it the oldest held is dropped (counted ``roster_pool_evicted``; the gateway or the
# retained roster brings it again).
MAX_ROSTER_CANDIDATES = 64
# Conversations known only from a roster pool, held grants or an unfinished chain
# (not joined yet): past it the oldest such state is dropped (``joining_evicted``),
# so rosters and grants sent to our inbox for invented conversations stay bounded.
MAX_JOINING = 64
AUTO_FLUSH_OPENS = 1_000  # receiving-chain state is written at least this often
# Unused reserved steps of a cleanly stopped engine (Engine.park), one record per
# conversation, consumed at the next load.
UNUSED_STEPS_PREFIX = "unused/"
CANDIDATE_PREFIX = "rosterpool/"  # rosters waiting for the epochs between (§5.2)
ENDS_PREFIX = "ends/"  # chain ends stated by senders, one record per conversation (§6.4)


@dataclass(frozen=True, slots=True)
class Publication:
    """Something the engine wants published: topic, payload, retain flag (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = False


class Opened(NamedTuple):
    """A decrypted, authenticated envelope (a named tuple: built once per message)."""

    cid: str
    sender: str
    epoch: int
    sender_index: int
    chain: int
    step: int
    message: Message
    signed: bool

    @property
    def dedupe_key(self) -> tuple[str, int, int, int, int]:
        return (self.cid, self.epoch, self.sender_index, self.chain, self.step)


class BundleStatus(enum.Enum):
    NEW = "new"
    SAME = "same"
    UPDATED = "updated"  # newer bundle, same keys
    KEY_CHANGED = "key_changed"  # newer bundle with different X25519/ML-KEM keys: warn loudly
    OLDER = "older"  # an older bundle than the one known: ignored


@dataclass(frozen=True, slots=True)
class BundleUpdate:
    pid: str
    status: BundleStatus
    fingerprint: str
    previous_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class GrantResult:
    """``needs_roster``: the grant is held until the roster of its epoch arrives.
    ``ends``: how many ends of the granter's earlier chains it taught us (envelopes
    held for them, :class:`~schemas.errors.ChainEndUnknown`, can be retried)."""

    cid: str
    installed: bool
    needs_roster: bool = False
    ends: int = 0


@dataclass(slots=True)
class _Conversation:
    cid: str
    cid_raw: bytes
    epoch: int  # the epoch entered; -1 while joining (no verified roster lists us yet)
    rosters: dict[int, Roster]  # every adopted roster: a verified chain up to ``tip``
    removed: bool = False
    tip: int = -1  # the newest adopted roster (= epoch once joined)
    # Rosters that do not chain yet (§5.2), by digest, oldest first.
    candidates: dict[bytes, Roster] = field(default_factory=dict)
    # Epochs older than ``epoch`` with a member removed since: their unsigned
    # envelopes need the sender's stated chain end (§6.4).
    closed: set[int] = field(default_factory=set)
    # Chain ends stated by their senders: (epoch, sender index, chain) -> next step.
    ends: dict[tuple[int, int, int], int] = field(default_factory=dict)
    # Where our own sending chains of earlier epochs ended, stated in our grants.
    sent_ends: tuple[ChainEnd, ...] = ()
    send: SendChain | None = None
    grant_base: tuple[int, bytes] | None = None  # (step, key) still owed to some members
    owed: set[str] = field(default_factory=set)
    recv: dict[tuple[int, int, int], RecvChain] = field(default_factory=dict)
    pending: list[bytes] = field(default_factory=list)
    # Sealing fast path, set on entering an epoch: encoded ``epoch|sender|chain``,
    # and the ``version|kind|epoch|sender|chain`` prefixes built from it per kind byte.
    header_mid: bytes = b""
    prefixes: dict[int, bytes] = field(default_factory=dict)
    sign_every: dict[int, int] = field(default_factory=dict)
    # Opening fast path: member pids of each kept epoch, by sender index.
    pids: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def roster(self) -> Roster:
        return self.rosters[self.epoch]


P = ParamSpec("P")
R = TypeVar("R")


def _pending_key(cid: str, grant: bytes) -> str:
    return f"pending/{cid}/{sha256(grant).hex()[:32]}"


def _roster_key(cid: str, epoch: int) -> str:
    return f"roster/{cid}/{epoch:08d}"


def _candidate_key(cid: str, digest: bytes) -> str:
    return f"{CANDIDATE_PREFIX}{cid}/{digest.hex()[:32]}"


def _ends_key(cid: str) -> str:
    return f"{ENDS_PREFIX}{cid}"


def _is_pq(roster: Roster, pid: str) -> bool:
    """Whether the roster lists ``pid`` as post-quantum (unknown pids count as such)."""
    return next((m.pq for m in roster.members if m.pid == pid), True)


def _mid(roster: Roster, pid: str, chain: int) -> bytes:
    return varint(roster.epoch) + varint(roster.index_of(pid)) + varint(chain)


def _verify_all(jobs: list[tuple[bytes, bytes, bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``(envelope, signer key)`` of the jobs ``(envelope, key, signature, signed bytes)``
    whose signature verifies."""
    out = []
    for data, key, signature, signed in jobs:
        try:
            ed25519_verify(key, signature, signed)
        except CryptoError:
            continue
        out.append((data, key))
    return out


def _counted(method: Callable[P, R]) -> Callable[P, R]:
    """Count FieldchatErrors by reason and hold the engine lock (entry points only)."""

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        engine = args[0]
        assert isinstance(engine, Engine)
        with engine._lock:
            try:
                return method(*args, **kwargs)
            except FieldchatError as exc:
                engine.counters[exc.reason] += 1
                raise

    wrapper.__doc__ = method.__doc__
    wrapper.__name__ = method.__name__
    return wrapper


class Engine:
    """One participant's end-to-end state.

    Args:
        identity: our keys.
        store: where state is persisted (default: in memory).
        topics: topic names for the publications.
        clock, random: injectable for reproducible vectors and tests.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        store: KeyStore | None = None,
        topics: Topics | None = None,
        clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.identity = identity
        self._pid = identity.pid
        self.store: KeyStore = store if store is not None else MemoryKeyStore()
        self.topics = topics or Topics()
        self.counters: Counter[str] = Counter()
        self._clock = clock
        self._random = random
        self._lock = threading.RLock()
        self._bundles: dict[str, Bundle] = {identity.pid: identity.bundle}
        self._verified: set[str] = set()
        self._convs: dict[str, _Conversation] = {}
        self._dirty: set[tuple[str, tuple[int, int, int]]] = set()
        self._opens_since_flush = 0
        # Envelopes whose signature preverify() checked: bytes -> the signer key it
        # verified under. Replaced per batch, entries dropped as open() uses them.
        self._preverified: dict[bytes, bytes] = {}
        self._parked = False  # park() ran: nothing more may be sealed
        self._load()

    @classmethod
    def open_store(
        cls,
        store: KeyStore,
        *,
        topics: Topics | None = None,
        post_quantum: bool = True,
        clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> Engine:
        """The engine of the identity in ``store``, creating one on first use."""
        raw = store.load("identity")
        if raw is None:
            identity = Identity.generate(random=random, clock=clock, post_quantum=post_quantum)
            store.save({"identity": identity.to_secret_bytes()})
        else:
            identity = Identity.from_secret_bytes(raw)
        return cls(identity, store=store, topics=topics, clock=clock, random=random)

    # -- identities -------------------------------------------------------------------

    @property
    def pid(self) -> str:
        return self.identity.pid

    def bundle_publication(self) -> Publication:
        return Publication(self.topics.bundle(self.pid), self.identity.bundle.to_bytes(), True)

    def bundle_of(self, pid: str) -> Bundle | None:
        return self._bundles.get(pid)

    def is_verified(self, pid: str) -> bool:
        return pid in self._verified

    @_counted
    def mark_verified(self, pid: str) -> None:
        """Record that ``pid``'s fingerprint was compared out of band.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        if pid not in self._bundles:
            raise UnknownParticipant(f"no bundle known for {pid}")
        self._verified.add(pid)
        self.store.save({f"verified/{pid}": self._bundles[pid].fingerprint().encode()})

    @_counted
    def learn_bundle(self, data: bytes) -> BundleUpdate:
        """Accept a participant's bundle, trusting it on first use.

        A newer bundle with different keys is accepted (keys rotate) but reported
        as ``KEY_CHANGED`` so the caller warns loudly; the pid itself cannot change
        keys, it is the hash of the identity key.

        Raises:
            WireError, CryptoError: malformed or badly signed bundle.
        """
        bundle = Bundle.from_bytes(data)
        known = self._bundles.get(bundle.pid)
        if known is None:
            status = BundleStatus.NEW
        elif known == bundle:
            return BundleUpdate(bundle.pid, BundleStatus.SAME, bundle.fingerprint())
        elif bundle.created_at <= known.created_at:
            return BundleUpdate(bundle.pid, BundleStatus.OLDER, known.fingerprint())
        elif (known.x25519, known.mlkem768) != (bundle.x25519, bundle.mlkem768):
            status = BundleStatus.KEY_CHANGED
            self._verified.discard(bundle.pid)
        else:
            status = BundleStatus.UPDATED
        self._bundles[bundle.pid] = bundle
        self.store.save(
            {f"bundle/{bundle.pid}": data}
            | ({f"verified/{bundle.pid}": None} if status is BundleStatus.KEY_CHANGED else {})
        )
        return BundleUpdate(
            bundle.pid, status, bundle.fingerprint(), known.fingerprint() if known else None
        )

    # -- conversations ----------------------------------------------------------------

    def conversations(self) -> list[str]:
        return sorted(self._convs)

    def roster(self, cid: str) -> Roster:
        """The current roster of ``cid``.

        Raises:
            UnknownConversation: no state for ``cid``.
        """
        return self._conv(cid).roster

    def is_member(self, cid: str) -> bool:
        conv = self._convs.get(cid)
        return conv is not None and not conv.removed

    def next_step(self, cid: str, epoch: int, sender_index: int, chain: int) -> int | None:
        """The step a receiving chain expects next; ``None`` before its grant arrives.

        Before any envelope of the chain was opened this is where its grant starts, so
        a client can tell that an early envelope overtook earlier ones.
        """
        with self._lock:
            conv = self._convs.get(cid)
            receiving = conv.recv.get((epoch, sender_index, chain)) if conv else None
            return None if receiving is None else receiving.step

    def reach(self, cid: str, epoch: int, sender_index: int, chain: int) -> int | None:
        """The furthest step of a receiving chain an unsigned envelope can be tried at
        now (``None`` before its grant): one held as
        :class:`~schemas.errors.UnsignedJumpTooFar` is worth retrying once this passes
        its step (§6.4)."""
        with self._lock:
            conv = self._convs.get(cid)
            receiving = conv.recv.get((epoch, sender_index, chain)) if conv else None
            return None if receiving is None else receiving.reach()

    def authentic(self, cid: str, data: bytes) -> bool | None:
        """Whether an envelope would authenticate now, changing no state: ``True`` or
        ``False``, or ``None`` when that cannot be told yet (no key, malformed, too far
        ahead to derive before authentication). Signed: its signature; unsigned: AES-GCM.

        A client that holds envelopes back for per-sender order asks this first, so
        that only genuine ones wait (several unsigned candidates may be served for one
        step: docs/gateway.md, "Receivers").
        """
        with self._lock:
            conv = self._convs.get(cid)
            try:
                _, flags, epoch, index, chain_no, step, header_len = read_header(data)
            except FieldchatError:
                return None
            chain = conv.recv.get((epoch, index, chain_no)) if conv else None
            if conv is None or chain is None:
                return None
            data = bytes(data)
            if flags & FLAG_SIGNED:
                end = len(data) - SIGNATURE_BYTES
                try:
                    ed25519_verify(chain.signer_key, data[end:], data[:end] + conv.cid_raw)
                except CryptoError:
                    return False
                return True
            return chain.authentic(step, data[header_len:], data[:header_len] + conv.cid_raw)

    def peek_receipt(self, cid: str, data: bytes) -> tuple[str, Receipt] | None:
        """The sender and receipt inside an envelope that is held back for display
        order, changing no state; ``None`` unless it is a receipt that authenticates
        now. A gap request (a MISSING receipt) must be answered at once even when its
        sender's chain has a gap of its own here: held until that gap fills or is
        given up, the answer comes too late for the asker's reorder window."""
        with self._lock:
            conv = self._convs.get(cid)
            try:
                kind, flags, epoch, index, chain_no, step, header_len = read_header(data)
            except FieldchatError:
                return None
            chain = conv.recv.get((epoch, index, chain_no)) if conv else None
            pids = conv.pids.get(epoch) if conv else None
            if kind is not EnvelopeKind.RECEIPT or conv is None or chain is None:
                return None
            if pids is None or index >= len(pids):
                return None
            data = bytes(data)
            end = len(data) - (SIGNATURE_BYTES if flags & FLAG_SIGNED else 0)
            try:
                if flags & FLAG_SIGNED:
                    ed25519_verify(chain.signer_key, data[end:], data[:end] + conv.cid_raw)
                aad = data[:header_len] + conv.cid_raw
                plaintext = chain.peek(step, data[header_len:end], aad)
                message = None
                if plaintext is not None:
                    message = decode_plaintext(
                        kind,
                        plaintext,
                        compressed=bool(flags & FLAG_COMPRESSED),
                        padded=bool(flags & FLAG_PADDED),
                    )
            except FieldchatError:  # CryptoError, WireError: not one to act on
                return None
            return (pids[index], message) if isinstance(message, Receipt) else None

    def oldest_epoch(self, cid: str) -> int:
        """The oldest roster epoch of ``cid`` we can open anything of: the current one,
        or an older one we still hold a receiving chain of (0 when unknown)."""
        with self._lock:
            conv = self._convs.get(cid)
            if conv is None:
                return 0
            return min([conv.epoch, *(epoch for epoch, _, _ in conv.recv)])

    def reservations_low(self, left: int) -> bool:
        """Whether a sending chain in use has ``left`` or fewer reserved steps unused.

        A chain not used since loading (none reserved in memory) is left alone: its
        first :meth:`seal` reserves, so an idle device does not skip steps at every
        start.
        """
        with self._lock:
            return any(
                conv.send is not None and 0 < conv.send.reserved - conv.send.step <= left
                for conv in self._convs.values()
                if not conv.removed
            )

    @_counted
    def renew_reservations(self, left: int) -> int:
        """Reserve the next window of every sending chain in use with ``left`` or fewer
        reserved steps unused; how many chains.

        Lets a client persist (and fsync) reservations ahead of need, off its sending
        path, instead of in the :meth:`seal` that finds the window used up (§6.3).

        Raises:
            KeyStoreError: a reservation could not be persisted (none is adopted).
        """
        renewed = 0
        for conv in self._convs.values():
            chain = conv.send
            if chain is None or conv.removed or not 0 < chain.reserved - chain.step <= left:
                continue
            self._reserve(conv, chain)
            renewed += 1
        return renewed

    def owed_grants(self, cid: str) -> set[str]:
        """Members we still owe our chain to because their bundle is unknown."""
        return set(self._conv(cid).owed)

    @_counted
    def create_conversation(
        self,
        members: Sequence[str] = (),
        *,
        policy: Policy | None = None,
        admins: Iterable[str] = (),
    ) -> tuple[str, list[Publication]]:
        """Found a conversation with us as admin; return its cid and what to publish.

        Raises:
            UnknownParticipant: a member's bundle has not been learned yet.
            NotAMember: ``policy.require_pq`` and a member has no ML-KEM key.
        """
        policy = policy or Policy()
        nonce = self._random(16)
        cid = cid_for(self.pid, nonce)
        admin_set = {self.pid, *admins}
        roster_members = self._members([self.pid, *members], admin_set, policy)
        roster = Roster.create(
            cid=cid,
            epoch=0,
            nonce=nonce,
            prev=b"",
            members=roster_members,
            policy=policy,
            issued_at=int(self._clock()),
            signer_key=self.identity.public,
            sign=self.identity.sign,
        )
        verify_roster_chain(roster, None)
        conv = _Conversation(cid=cid, cid_raw=decode_id(cid), epoch=0, rosters={})
        self._convs[cid] = conv
        self._adopt(conv, roster)
        return cid, [self._roster_publication(roster), *self._enter_epoch(conv, roster)]

    @_counted
    def add_members(self, cid: str, pids: Sequence[str]) -> list[Publication]:
        """Invite members: a new epoch whose roster lists them (admins only).

        Raises:
            NotAMember: we are not an admin, or policy requires ML-KEM they lack.
            UnknownParticipant: a bundle has not been learned yet.
        """
        conv = self._conv(cid)
        current = conv.roster
        new = [p for p in pids if p not in current.pids]
        admins = {m.pid for m in current.members if m.admin}
        return self._rotate(conv, [*current.pids, *new], admins, current.policy)

    @_counted
    def remove_members(self, cid: str, pids: Sequence[str]) -> list[Publication]:
        """Remove members: a new epoch without them; every remaining member re-keys.

        Raises:
            NotAMember: we are not an admin of the current roster.
        """
        conv = self._conv(cid)
        current = conv.roster
        drop = set(pids)
        keep = [p for p in current.pids if p not in drop]
        admins = {m.pid for m in current.members if m.admin} - drop
        return self._rotate(conv, keep, admins, current.policy)

    @_counted
    def set_policy(self, cid: str, policy: Policy) -> list[Publication]:
        """Change the conversation policy (a new epoch, admins only)."""
        conv = self._conv(cid)
        current = conv.roster
        admins = {m.pid for m in current.members if m.admin}
        return self._rotate(conv, list(current.pids), admins, policy)

    def _rotate(
        self, conv: _Conversation, pids: list[str], admins: set[str], policy: Policy
    ) -> list[Publication]:
        current = conv.roster
        if conv.removed or not current.is_admin(self.pid):
            raise NotAMember(f"only an admin of {conv.cid} can change its roster")
        if not admins & set(pids):
            admins = {self.pid} if self.pid in pids else {pids[0]}
        roster = Roster.create(
            cid=conv.cid,
            epoch=current.epoch + 1,
            nonce=b"",
            prev=current.digest(),
            members=self._members(pids, admins, policy),
            policy=policy,
            issued_at=int(self._clock()),
            signer_key=self.identity.public,
            sign=self.identity.sign,
        )
        verify_roster_chain(roster, current)
        # A new member must verify the chain from epoch 0 before it trusts the roster
        # (§5.2): the earlier rosters go to its inbox, one payload each, before its
        # grants, so a device without a gateway gets them too.
        earlier = [conv.rosters[e].to_bytes() for e in sorted(conv.rosters)]
        joined = [p for p in roster.pids if p not in current.pids]
        history = [Publication(self.topics.inbox(p), data) for p in joined for data in earlier]
        self._adopt(conv, roster)
        return [self._roster_publication(roster), *history, *self._enter_epoch(conv, roster)]

    def _members(self, pids: Sequence[str], admins: set[str], policy: Policy) -> tuple[Member, ...]:
        out = []
        for pid in dict.fromkeys(pids):
            bundle = self._bundles.get(pid)
            if bundle is None:
                raise UnknownParticipant(f"no bundle known for {pid}: fetch it first")
            if policy.require_pq and not bundle.post_quantum:
                raise NotAMember(f"{pid} has no ML-KEM key and the policy requires one")
            out.append(Member(pid=pid, admin=pid in admins, pq=bundle.post_quantum))
        return tuple(out)

    def _roster_publication(self, roster: Roster) -> Publication:
        """A new roster goes to ``c/{cid}/propose``, not retained: a verifier (the
        embedded broker, or the gateway) retains it on ``c/{cid}/roster`` once it
        chains (schemas.topics)."""
        return Publication(self.topics.propose(roster.cid), roster.to_bytes())

    @_counted
    def handle_roster(self, data: bytes) -> list[Publication]:
        """Accept a roster (from ``c/{cid}/roster``, the inbox or the gateway); return
        our grants for its epoch once we enter it.

        A roster is adopted only through a verified chain (§5.2): from epoch 0 for a
        conversation we have no roster of, else from the newest roster adopted. One
        that does not chain yet is held and adopted once the epochs between arrive,
        in any order (its arrival then returns the publications).

        Raises:
            WireError, CryptoError: malformed or badly signed.
            RosterRejected: does not follow the adopted chain (forged, stale, bad signer).
            RosterPending: held until the rosters between arrive: fetch them.
        """
        return self._handle_roster(data)

    def _handle_roster(self, data: bytes) -> list[Publication]:
        roster = Roster.from_bytes(data)
        conv = self._convs.get(roster.cid)
        fresh = conv is None
        if conv is None:
            conv = self._joining(roster.cid)
        try:
            return self._take_roster(conv, roster)
        except RosterRejected:
            if fresh:
                del self._convs[roster.cid]
            raise

    def _take_roster(self, conv: _Conversation, roster: Roster) -> list[Publication]:
        known = conv.rosters.get(roster.epoch)
        if known is not None:
            if known.digest() == roster.digest():
                self.counters["duplicate"] += 1
                return []
            raise RosterRejected(f"another roster of epoch {roster.epoch} is adopted")
        if roster.epoch <= conv.tip:
            raise RosterRejected(f"roster epoch {roster.epoch} is older than those kept")
        if roster.epoch != conv.tip + 1:
            self._hold_candidate(conv, roster)
            raise RosterPending(
                f"roster epoch {roster.epoch} of {roster.cid} waits for the epochs "
                f"after {conv.tip}",
                cid=roster.cid,
                have=conv.tip,
                want=roster.epoch,
            )
        verify_roster_chain(roster, conv.rosters.get(conv.tip))
        self._adopt(conv, roster)
        self._adopt_candidates(conv)
        return self._follow_tip(conv)

    def awaiting_rosters(self) -> dict[str, int]:
        """Conversations holding rosters that wait for missing epochs: cid -> the
        newest epoch of the verified chain held (-1: none yet, epoch 0 is missing)."""
        with self._lock:
            return {cid: conv.tip for cid, conv in self._convs.items() if conv.candidates}

    def _joining(self, cid: str) -> _Conversation:
        """State for a conversation not joined yet, dropping the oldest such state
        past MAX_JOINING."""
        joining = [c for c in self._convs.values() if c.epoch < 0]
        if len(joining) >= MAX_JOINING:
            self._forget(joining[0])
            self.counters["joining_evicted"] += 1
        conv = _Conversation(cid=cid, cid_raw=decode_id(cid), epoch=-1, rosters={}, removed=True)
        self._convs[cid] = conv
        return conv

    def _forget(self, conv: _Conversation) -> None:
        """Drop a conversation we never joined, with everything stored about it."""
        del self._convs[conv.cid]
        writes: dict[str, bytes | None] = dict.fromkeys(
            [_roster_key(conv.cid, e) for e in conv.rosters]
            + [_candidate_key(conv.cid, d) for d in conv.candidates]
            + [_pending_key(conv.cid, g) for g in conv.pending]
        )
        self.store.save(writes)

    def _hold_candidate(self, conv: _Conversation, roster: Roster) -> None:
        digest = roster.digest()
        if digest in conv.candidates:
            self.counters["duplicate"] += 1
            return
        writes: dict[str, bytes | None] = {_candidate_key(conv.cid, digest): roster.to_bytes()}
        if len(conv.candidates) >= MAX_ROSTER_CANDIDATES:
            oldest = next(iter(conv.candidates))
            del conv.candidates[oldest]
            writes[_candidate_key(conv.cid, oldest)] = None
            self.counters["roster_pool_evicted"] += 1
        conv.candidates[digest] = roster
        self.store.save(writes)

    def _adopt(self, conv: _Conversation, roster: Roster) -> None:
        """Record a roster whose chain was verified (it becomes the tip)."""
        conv.rosters[roster.epoch] = roster
        conv.tip = roster.epoch
        conv.pids[roster.epoch] = roster.pids
        conv.sign_every[roster.epoch] = roster.policy.sign_every
        for old in sorted(conv.pids)[:-KEEP_EPOCHS]:
            del conv.pids[old]
            conv.sign_every.pop(old, None)
        self.store.save({_roster_key(conv.cid, roster.epoch): roster.to_bytes()})

    def _adopt_candidates(self, conv: _Conversation) -> None:
        """Adopt held rosters that now chain, epoch after epoch; drop those left behind.

        At most MAX_ROSTER_CANDIDATES chain checks per epoch adopted (digests come from
        the pool's keys): bounded work for rosters nobody has authenticated yet.
        """
        while conv.candidates:
            writes: dict[str, bytes | None] = {}
            for digest in [d for d, r in conv.candidates.items() if r.epoch <= conv.tip]:
                del conv.candidates[digest]  # behind the chain: another roster won
                writes[_candidate_key(conv.cid, digest)] = None
            successors = {r.prev for r in conv.candidates.values() if r.epoch == conv.tip + 2}
            nxt = sorted(
                ((d, r) for d, r in conv.candidates.items() if r.epoch == conv.tip + 1),
                key=lambda item: item[0] not in successors,  # one a later roster extends first
            )
            tip = conv.rosters.get(conv.tip)
            chosen = None
            for digest, roster in nxt:
                del conv.candidates[digest]
                writes[_candidate_key(conv.cid, digest)] = None
                try:
                    verify_roster_chain(roster, tip)
                except RosterRejected:
                    self.counters[RosterRejected.reason] += 1
                    continue
                chosen = roster
                break
            self.store.save(writes)
            if chosen is None:
                return
            self._adopt(conv, chosen)

    def _follow_tip(self, conv: _Conversation) -> list[Publication]:
        """Enter the newest adopted epoch: at once when we are in the conversation,
        when joining only once a verified roster lists us."""
        if conv.tip == conv.epoch or (
            conv.epoch < 0 and self.pid not in conv.rosters[conv.tip].pids
        ):
            return []
        return self._enter_epoch(conv, conv.rosters[conv.tip])

    def _closed_epochs(self, conv: _Conversation) -> set[int]:
        """Kept epochs before ours with a member that a later roster no longer lists."""
        out = set()
        for epoch, pids in conv.pids.items():
            members = set(pids)
            for later in range(epoch + 1, conv.epoch + 1):
                roster = conv.rosters.get(later)
                if roster is None or not members <= set(roster.pids):
                    out.add(epoch)  # a roster we lack (an older store) counts as removal
                    break
        return out

    def _enter_epoch(self, conv: _Conversation, roster: Roster) -> list[Publication]:
        """Enter the epoch of an adopted roster: drop what removed members could use,
        start our chain and grant it (with where our previous chain ended)."""
        conv.epoch = roster.epoch
        current = set(roster.pids)
        writes: dict[str, bytes | None] = {}
        for key, chain in list(conv.recv.items()):
            pids = conv.pids.get(chain.epoch)
            if pids is None or pids[chain.sender] not in current:
                del conv.recv[key]
                self._dirty.discard((conv.cid, key))
                writes[self._recv_key(conv.cid, key)] = None
        ends = {k: v for k, v in conv.ends.items() if k in conv.recv}
        if ends != conv.ends:
            conv.ends = ends
            writes[_ends_key(conv.cid)] = self._ends_record(conv)
        conv.closed = self._closed_epochs(conv)
        if conv.send is not None:
            # Receivers accept unsigned envelopes of this chain below this step once
            # someone has been removed (§6.4): every step we sealed is below it, also
            # after a crash (we resumed at the reservation).
            end = ChainEnd(epoch=conv.send.epoch, chain=conv.send.chain, next_step=conv.send.step)
            keep = [e for e in conv.sent_ends if e.epoch > roster.epoch - KEEP_EPOCHS]
            conv.sent_ends = (*keep, end)[-(KEEP_EPOCHS - 1) :]
        publications: list[Publication] = []
        if self.pid not in current:
            conv.removed = True
            conv.send = None
            conv.grant_base = None
            conv.owed = set()
        else:
            conv.removed = False
            key0 = self._random(32)
            conv.send = SendChain(roster.epoch, 0, 0, key0, 0)
            conv.header_mid = _mid(roster, self.pid, 0)
            conv.prefixes = {}
            conv.grant_base = (0, key0)
            conv.owed = current - {self.pid}
            publications = self._pay_grants(conv)
        writes.update(self._send_record(conv))
        self.store.save(writes)
        pending, conv.pending = conv.pending, []
        if pending:
            # Grants still early are held again (and re-saved) by _handle_grant.
            self.store.save({_pending_key(conv.cid, data): None for data in pending})
        for data in pending:
            try:
                self._handle_grant(data)
            except FieldchatError as exc:
                self.counters[exc.reason] += 1
        return publications

    def _pay_grants(self, conv: _Conversation) -> list[Publication]:
        if conv.send is None or conv.grant_base is None:
            return []
        roster = conv.roster
        step, key = conv.grant_base
        payload = ChainGrant(
            epoch=roster.epoch,
            roster=roster.digest(),
            sender=roster.index_of(self.pid),
            chain=conv.send.chain,
            step=step,
            key=key,
            ends=conv.sent_ends,
        )
        out = []
        for pid in sorted(conv.owed):
            bundle = self._bundles.get(pid)
            if bundle is None:
                continue
            grant = make_grant(self.identity, bundle, conv.cid, payload, random=self._random)
            out.append(Publication(self.topics.inbox(pid), grant.to_bytes()))
            conv.owed.discard(pid)
        if not conv.owed:
            conv.grant_base = None  # forget the old chain key: forward secrecy (§6.2)
        return out

    @_counted
    def pay_owed_grants(self, cid: str | None = None) -> list[Publication]:
        """Grants owed to members whose bundles have arrived since (all or one cid)."""
        out: list[Publication] = []
        for conv in [self._conv(cid)] if cid else list(self._convs.values()):
            if conv.owed:
                before = len(conv.owed)
                out += self._pay_grants(conv)
                if len(conv.owed) != before:
                    self.store.save(self._send_record(conv))
        return out

    # -- grants -----------------------------------------------------------------------

    @_counted
    def handle_inbox(self, data: bytes) -> GrantResult | list[Publication]:
        """Accept what arrived in our inbox: a grant (:meth:`handle_grant`'s result) or
        a roster an inviting admin sent (:meth:`handle_roster`'s publications)."""
        return self._handle_roster(data) if is_roster(data) else self._handle_grant(data)

    @_counted
    def handle_grant(self, data: bytes) -> GrantResult:
        """Accept a grant from our inbox.

        Raises:
            WireError, CryptoError, WeakKey: malformed, forged or undecryptable.
            GrantRejected: not for us, from a non-member, for another roster or
                downgraded to X25519 for a post-quantum member.
        """
        return self._handle_grant(data)

    def _handle_grant(self, data: bytes) -> GrantResult:
        grant = Grant.from_bytes(data)
        if grant.mode is not GrantMode.HYBRID and self.identity.mlkem_seed is not None:
            # We publish an ML-KEM key. An X25519-only grant is right only from a
            # member without ML-KEM (a browser); from anyone else it is a downgrade.
            # Checked before decrypting against the newest roster, and after against
            # the grant's own epoch.
            # A grant for a conversation we have no roster of yet is held and checked
            # when the roster arrives (a browser may have founded the conversation).
            known = self._convs.get(grant.cid)
            if known is not None and known.epoch >= 0 and _is_pq(known.roster, grant.granter):
                raise GrantRejected("X25519-only grant to a post-quantum member (downgrade)")
        payload = accept_grant(self.identity, grant)
        conv = self._convs.get(grant.cid)
        if conv is None or conv.epoch < 0 or payload.epoch > conv.epoch:
            # Not entered yet: held until its roster is adopted through a verified chain.
            if conv is None:
                conv = self._joining(grant.cid)
            if len(conv.pending) >= MAX_PENDING_GRANTS:
                raise GrantRejected(f"too many grants waiting for the roster of {grant.cid}")
            conv.pending.append(bytes(data))
            # Held durably: the inbox message is gone once the client acknowledges it.
            self.store.save({_pending_key(grant.cid, data): bytes(data)})
            return GrantResult(grant.cid, installed=False, needs_roster=True)
        if payload.epoch not in conv.pids:
            raise GrantRejected(f"grant for epoch {payload.epoch}, which is no longer kept")
        roster = conv.rosters[payload.epoch]
        if roster.digest() != payload.roster:
            raise GrantRejected("grant for another roster of this epoch")
        try:
            member = roster.member_at(payload.sender)
        except NotAMember:
            raise GrantRejected("grant for a sender index outside the roster") from None
        if member.pid != grant.granter or member.pid == self.pid:
            raise GrantRejected("grant signed by someone other than the chain's member")
        if self.pid not in roster.pids:
            raise GrantRejected("grant for an epoch we are not a member of")
        if grant.mode is not GrantMode.HYBRID and member.pq and self.identity.mlkem_seed:
            raise GrantRejected("X25519-only grant to a post-quantum member (downgrade)")
        key = (payload.epoch, payload.sender, payload.chain)
        if key in conv.recv:
            self.counters["duplicate"] += 1
            return GrantResult(grant.cid, installed=False, ends=self._learn_ends(conv, payload))
        chain = RecvChain(
            payload.epoch,
            payload.sender,
            payload.chain,
            payload.step,
            payload.key,
            grant.granter_key,
        )
        conv.recv[key] = chain
        self.store.save({self._recv_key(grant.cid, key): self._recv_record(chain)})
        return GrantResult(grant.cid, installed=True, ends=self._learn_ends(conv, payload))

    def _learn_ends(self, conv: _Conversation, payload: ChainGrant) -> int:
        """Record where the granter's earlier chains ended (§6.4), for chains we hold
        (so the record stays within the receiving chains); how many changed. A lower
        end stated again wins: a sender's end only ever refuses more."""
        granter = conv.pids[payload.epoch][payload.sender]
        learned = 0
        for end in payload.ends:
            pids = conv.pids.get(end.epoch)
            if pids is None or granter not in pids:
                continue
            key = (end.epoch, pids.index(granter), end.chain)
            known = conv.ends.get(key)
            if key in conv.recv and (known is None or end.next_step < known):
                conv.ends[key] = end.next_step
                learned += 1
        if learned:
            self.store.save({_ends_key(conv.cid): self._ends_record(conv)})
        return learned

    # -- messages ---------------------------------------------------------------------

    def seal(self, cid: str, message: Message) -> bytes:
        """Encrypt (and per policy sign) ``message`` for ``cid``; the envelope bytes.

        The chain step is persisted (in reservations of RESERVE_STEPS) before the
        envelope is returned, so no key or nonce is ever used twice (§6.3).

        Raises:
            UnknownConversation, NotAMember: no sending chain for ``cid``.
            LimitExceeded: the message is too large.
            KeyStoreError: the reservation could not be persisted (nothing is sealed).
        """
        # Inlined lock and counting (not @_counted): this is the per-message path.
        with self._lock:
            try:
                return self._seal(cid, message)
            except FieldchatError as exc:
                self.counters[exc.reason] += 1
                raise

    def _seal(self, cid: str, message: Message) -> bytes:
        if self._parked:
            raise KeyStoreError("the engine stopped (parked at close): open it again to send")
        conv = self._conv(cid)
        chain = conv.send
        if chain is None or conv.removed:
            raise NotAMember(f"not a member of {cid}")
        if chain.step >= chain.reserved:
            self._reserve(conv, chain)
        policy = conv.rosters[conv.epoch].policy
        if policy.compress or policy.pad:
            plaintext, compressed, padded = encode_plaintext(
                message, compress=policy.compress, pad=policy.pad
            )
        else:
            plaintext, compressed, padded = encode_plaintext(message)
        step, key, nonce = chain.next_key()
        signed = policy.sign_every != 0 and step % policy.sign_every == 0
        kind_byte = (
            kind_of(message)
            | (FLAG_SIGNED if signed else 0)
            | (FLAG_COMPRESSED if compressed else 0)
            | (FLAG_PADDED if padded else 0)
        )
        prefix = conv.prefixes.get(kind_byte)
        if prefix is None:
            prefix = conv.prefixes[kind_byte] = bytes((VERSION, kind_byte)) + conv.header_mid
        header = prefix + (bytes((step,)) if step < 0x80 else step_bytes(step))
        body = header + aead_seal(key, nonce, plaintext, header + conv.cid_raw)
        if signed:
            return body + self.identity.sign(body + conv.cid_raw)
        return body

    def open(self, cid: str, data: bytes) -> Opened | None:
        """Authenticate and decrypt an envelope of ``cid``.

        Returns ``None`` for a duplicate or our own envelope echoed by the broker.

        Raises:
            WireError, UnsupportedVersion, LimitExceeded: malformed bytes.
            CryptoError: tampered, wrong key, bad signature (opaque).
            MissingKey: no grant (or roster) for this chain yet: hold and retry. Its
                subclasses too: ChainEndUnknown (retry when the sender's next grant
                arrives), UnsignedJumpTooFar (retry when :meth:`reach` passes the step).
            ChainClosed: unsigned, old epoch, at or past the end its sender stated.
            StaleEpoch: from a member removed since; NotAMember: bad sender index.
            SignatureRequired, ForwardJumpTooLarge, SkippedKeyMissing: policy/limits.
            UnknownConversation: no state for ``cid``.
        """
        with self._lock:
            try:
                return self._open(cid, data)
            except FieldchatError as exc:
                self.counters[exc.reason] += 1
                raise

    def preverify(self, envelopes: Sequence[tuple[str, bytes]], executor: Executor) -> int:
        """Check the signatures of envelopes about to be opened, two threads at a time.

        Ed25519 verification (≈ 180 µs, most of what opening a signed envelope costs)
        releases the GIL: the calling thread checks half of the batch while
        ``executor`` checks the other half. Nothing is opened or changed here; the
        envelopes are then opened one by one, in order, by :meth:`open`, which skips
        the check only for these exact bytes under the same signer key and checks
        everything else itself (a failed or unknown one raises there, in its place).
        How many verified.
        """
        jobs: list[tuple[bytes, bytes, bytes, bytes]] = []
        with self._lock:
            for cid, raw in envelopes:
                conv = self._convs.get(cid)
                if conv is None:
                    continue
                try:
                    _, flags, epoch, sender_index, chain_no, _, _ = read_header(raw)
                except FieldchatError:
                    continue
                chain = conv.recv.get((epoch, sender_index, chain_no))
                if not flags & FLAG_SIGNED or chain is None:
                    continue
                data = bytes(raw)
                end = len(data) - SIGNATURE_BYTES
                jobs.append((data, chain.signer_key, data[end:], data[:end] + conv.cid_raw))
        if len(jobs) < 2:  # nothing to share between two threads
            return 0
        theirs = executor.submit(_verify_all, jobs[1::2])
        verified = _verify_all(jobs[::2]) + theirs.result()
        with self._lock:
            self._preverified = dict(verified)
        return len(verified)

    def _open(self, cid: str, data: bytes) -> Opened | None:  # noqa: PLR0912, PLR0915
        # One function on purpose: this is the per-message path (PROTOCOL.md §6.4).
        conv = self._convs.get(cid)
        if conv is None or conv.epoch < 0:
            raise UnknownConversation(f"unknown conversation {cid[:40]}")
        kind, flags, epoch, sender_index, chain_no, step, header_len = read_header(data)
        data = bytes(data)
        pids = conv.pids.get(epoch)
        if pids is None:
            if epoch > conv.epoch:
                raise MissingKey(f"roster of epoch {epoch} not known yet")
            raise StaleEpoch(f"epoch {epoch} is no longer kept")
        if conv.removed and epoch >= conv.epoch:
            raise NotAMember(f"removed from {cid} at epoch {conv.epoch}")
        if sender_index >= len(pids):
            raise NotAMember(f"no member {sender_index} in {cid} at epoch {epoch}")
        sender = pids[sender_index]
        if sender == self._pid:
            self.counters["own"] += 1
            return None
        if epoch < conv.epoch and (conv.removed or sender not in conv.pids[conv.epoch]):
            raise StaleEpoch(f"{sender} was removed after epoch {epoch}")
        chain = conv.recv.get((epoch, sender_index, chain_no))
        if chain is None:
            if epoch < conv.epoch and self._pid not in pids:
                raise StaleEpoch(f"epoch {epoch} is from before we joined")
            raise MissingKey(f"no grant yet for {sender} in epoch {epoch}")
        end = len(data)
        signed = bool(flags & FLAG_SIGNED)
        if signed:
            # Verified before any chain step is derived (§6.4): a forged signature costs
            # one verification, whatever step it names.
            end -= SIGNATURE_BYTES
            if self._preverified.pop(data, None) != chain.signer_key:
                ed25519_verify(chain.signer_key, data[end:], data[:end] + conv.cid_raw)
        else:
            if (every := conv.sign_every[epoch]) and step % every == 0:
                raise SignatureRequired("the conversation policy requires a signature")
            if epoch in conv.closed:
                # Someone removed since holds this epoch's chain keys (§6.4, §7).
                stated = conv.ends.get((epoch, sender_index, chain_no))
                if stated is None:
                    raise ChainEndUnknown(f"{sender} has not stated the end of epoch {epoch}")
                if step >= stated:
                    raise ChainClosed(
                        f"unsigned step {step} of epoch {epoch}: {sender} ended it at {stated}"
                    )
        plaintext = chain.open(
            step, data[header_len:end], data[:header_len] + conv.cid_raw, authenticated=signed
        )
        if plaintext is None:
            self.counters["duplicate"] += 1
            return None
        if not chain.dirty:
            chain.dirty = True
            self._dirty.add((cid, (epoch, sender_index, chain_no)))
        self._opens_since_flush += 1
        if self._opens_since_flush >= AUTO_FLUSH_OPENS:
            self._flush()
        if flags & (FLAG_COMPRESSED | FLAG_PADDED):
            message = decode_plaintext(
                kind,
                plaintext,
                compressed=bool(flags & FLAG_COMPRESSED),
                padded=bool(flags & FLAG_PADDED),
            )
        else:
            message = decode_plaintext(kind, plaintext)
        return Opened(cid, sender, epoch, sender_index, chain_no, step, message, signed)

    def leave(self, cid: str) -> bytes:
        """A sealed LEAVE control: admins remove us in the next epoch on receipt."""
        return self.seal(cid, Control(op=ControlOp.LEAVE))

    @_counted
    def flush(self) -> None:
        """Persist receiving-chain state changed since the last flush (batched writes)."""
        self._flush()

    def park(self) -> int:
        """On a clean stop, keep the reserved steps not used yet; how many chains.

        Without this a restart resumes at the reservation (§6.3) and skips the unused
        steps: receivers then see a jump, hold what follows for the missing steps
        (``reorder_window_s``) and record a gap that never fills, after every restart
        (each ``fieldchat device send`` is one). The record holds message keys of
        steps never used, so forward secrecy is unchanged; the next load adopts and
        deletes it durably before anything is sealed, so a crash after that start
        falls back to the reservation. Nothing can be sealed after this call.

        Raises:
            KeyStoreError: the record could not be written (the next start then
                resumes at the reservation, as after a crash).
        """
        with self._lock:
            self._parked = True
            items: dict[str, bytes | None] = {}
            for conv in self._convs.values():
                chain = conv.send
                if chain is None or conv.removed or not chain.ahead:
                    continue
                items[f"{UNUSED_STEPS_PREFIX}{conv.cid}"] = pack(
                    (chain.epoch, chain.chain, chain.step, tuple(chain.ahead))
                )
            if items:
                self.store.save(items)
            return len(items)

    def _flush(self) -> None:
        writes: dict[str, bytes | None] = {}
        for cid, key in self._dirty:
            conv = self._convs.get(cid)
            chain = conv.recv.get(key) if conv else None
            if chain is not None:
                chain.dirty = False
                writes[self._recv_key(cid, key)] = self._recv_record(chain)
        if writes:
            self.store.save(writes)
        self._dirty.clear()
        self._opens_since_flush = 0

    # -- persistence ------------------------------------------------------------------

    def _conv(self, cid: str) -> _Conversation:
        conv = self._convs.get(cid)
        if conv is None or conv.epoch < 0:
            raise UnknownConversation(f"unknown conversation {cid[:40]}")
        return conv

    @staticmethod
    def _recv_key(cid: str, key: tuple[int, int, int]) -> str:
        return f"recv/{cid}/{key[0]}/{key[1]}/{key[2]}"

    @staticmethod
    def _recv_record(chain: RecvChain) -> bytes:
        return pack(
            (
                chain.epoch,
                chain.sender,
                chain.chain,
                chain.step,
                chain.key,
                chain.signer_key,
                chain.evicted,
                tuple(chain.skipped.items()),
            )
        )

    def _reserve(self, conv: _Conversation, chain: SendChain) -> None:
        """Persist the chain's next reservation, then use it (§6.3).

        The write may join a transaction of the caller's that later fails (a full
        disk at the next row): the store then undoes the adoption with it, so memory
        never uses steps past a reservation the disk does not hold, which a restart
        would hand out again.
        """
        until, chain_key, keys = chain.plan()
        self.store.save(self._send_record(conv, (until, chain_key)))
        persisted = chain.reserved, chain.key
        chain.commit(until, chain_key, keys)
        self.store.on_rollback(lambda: self._forget_reservation(chain, *persisted))

    def _forget_reservation(self, chain: SendChain, reserved: int, chain_key: bytes) -> None:
        with self._lock:
            chain.forget(reserved, chain_key)

    def _send_record(
        self, conv: _Conversation, reservation: tuple[int, bytes] | None = None
    ) -> dict[str, bytes | None]:
        key = f"{SEND_CHAIN_PREFIX}{conv.cid}"
        chain = conv.send
        ends = tuple((e.epoch, e.chain, e.next_step) for e in conv.sent_ends)
        if chain is None:
            return {key: pack((conv.epoch, None, None, None, None, (), ends))}
        reserved, chain_key = reservation or (chain.reserved, chain.key)
        return {
            key: pack(
                (
                    conv.epoch,
                    chain.chain,
                    reserved,
                    chain_key,
                    conv.grant_base,
                    tuple(sorted(conv.owed)),
                    ends,
                )
            )
        }

    @staticmethod
    def _ends_record(conv: _Conversation) -> bytes:
        return pack(tuple((*key, step) for key, step in sorted(conv.ends.items())))

    def _unpark(self) -> None:
        """Adopt the unused steps :meth:`park` kept, if they still fit the reservation
        on disk, then delete the records durably before anything can be sealed."""
        parked = self.store.load_prefix(UNUSED_STEPS_PREFIX)
        if not parked:
            return
        for key, raw in parked.items():
            conv = self._convs.get(key.split("/", 1)[1])
            chain = conv.send if conv is not None else None
            try:
                epoch, chain_no, step, keys = fields(unpack(raw, "unused steps"), 4, "unused")
            except WireError:
                continue  # an optimisation only: the reservation stands, as after a crash
            if (
                chain is not None
                and (epoch, chain_no) == (chain.epoch, chain.chain)
                and chain.step == chain.reserved
                and isinstance(step, int)
                and isinstance(keys, tuple)
                and 0 < len(keys) == chain.reserved - step
                and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
            ):
                chain.step = step
                chain.ahead.extend(keys)
        self.store.save(dict.fromkeys(parked))

    def _load(self) -> None:
        try:
            self._load_records()
        except (WireError, TypeError, ValueError, KeyError) as exc:
            raise KeyStoreError("the key store holds corrupt engine state") from exc

    def _load_records(self) -> None:  # noqa: PLR0912 - one pass per record kind
        for raw in self.store.load_prefix("bundle/").values():
            bundle = Bundle.from_bytes(raw)
            self._bundles[bundle.pid] = bundle
        for key in self.store.load_prefix("verified/"):
            self._verified.add(key.split("/", 1)[1])
        for _, raw in sorted(self.store.load_prefix("roster/").items()):
            roster = Roster.from_bytes(raw)
            conv = self._convs.get(roster.cid)
            if conv is None:
                conv = _Conversation(roster.cid, decode_id(roster.cid), -1, {}, removed=True)
                self._convs[roster.cid] = conv
            conv.rosters[roster.epoch] = roster
            conv.tip = max(conv.tip, roster.epoch)
        for conv in self._convs.values():
            for epoch in sorted(conv.rosters)[-KEEP_EPOCHS:]:
                conv.pids[epoch] = conv.rosters[epoch].pids
                conv.sign_every[epoch] = conv.rosters[epoch].policy.sign_every
        for key, raw in self.store.load_prefix(SEND_CHAIN_PREFIX).items():
            conv = self._convs[key.split("/", 1)[1]]
            record = unpack(raw, "send record")
            if isinstance(record, tuple) and len(record) == 6:  # written before chain ends
                record = (*record, ())
            epoch, chain_no, reserved, reserved_key, grant_base, owed, ends = fields(
                record, 7, "send record"
            )
            # The epoch entered: the tip once joined (an older store may hold a newer
            # roster it never entered; the engine then enters it on the next roster).
            conv.epoch = epoch
            conv.removed = chain_no is None or self.pid not in conv.roster.pids
            conv.sent_ends = tuple(ChainEnd(epoch=e, chain=c, next_step=n) for e, c, n in ends)
            if chain_no is not None and epoch == conv.epoch:
                # Resume at the reservation: steps before it may have been used (§6.3).
                conv.send = SendChain(epoch, chain_no, reserved, reserved_key, reserved)
                conv.header_mid = _mid(conv.roster, self.pid, chain_no)
                conv.prefixes = {}
                conv.grant_base = tuple(grant_base) if grant_base else None
                conv.owed = set(owed)
        self._unpark()
        for _, raw in sorted(self.store.load_prefix(CANDIDATE_PREFIX).items()):
            roster = Roster.from_bytes(raw)
            held = self._convs.get(roster.cid)
            if held is None:
                held = _Conversation(roster.cid, decode_id(roster.cid), -1, {}, removed=True)
                self._convs[roster.cid] = held
            held.candidates[roster.digest()] = roster
        for key, raw in self.store.load_prefix("pending/").items():
            cid = key.split("/")[1]
            held = self._convs.get(cid)
            if held is None:
                held = _Conversation(cid, decode_id(cid), -1, {}, removed=True)
                self._convs[cid] = held
            held.pending.append(raw)
        for key, raw in self.store.load_prefix("recv/").items():
            cid = key.split("/")[1]
            epoch, sender, chain_no, step, ck, signer, evicted, skipped = fields(
                unpack(raw, "recv record"), 8, "recv record"
            )
            conv = self._convs.get(cid)
            if conv is None or epoch not in conv.pids:
                continue
            conv.recv[(epoch, sender, chain_no)] = RecvChain(
                epoch, sender, chain_no, step, ck, signer, OrderedDict(skipped), evicted
            )
        for key, raw in self.store.load_prefix(ENDS_PREFIX).items():
            conv = self._convs.get(key[len(ENDS_PREFIX) :])
            if conv is not None:
                for epoch, sender, chain_no, step in unpack(raw, "chain ends"):
                    conv.ends[(epoch, sender, chain_no)] = step
        for conv in self._convs.values():
            if conv.epoch >= 0:
                conv.closed = self._closed_epochs(conv)
