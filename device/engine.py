"""The end-to-end engine: conversations, rosters, grants, sealing and opening.

Pure: no network and no files except through the injected :class:`KeyStore`.
Methods return what must be published (:class:`Publication`) instead of sending it,
so the MQTT client, the gateway tests, the benchmarks and the vector generator all
drive the same code. Every rejection raises a :class:`~schemas.FieldchatError`
subclass and is counted in :attr:`Engine.counters` under its ``reason``; duplicates
return ``None`` and are counted as ``duplicate``. See PROTOCOL.md §5-§7.

:class:`Engine` is a façade: it holds the lock and the counters and hands each call
to the part whose job it is, all sharing one table of conversations
(:mod:`~fieldchat.device._conversation`):

- :mod:`~fieldchat.device._bundles`: participants' bundles, trusted on first use;
- :mod:`~fieldchat.device._rosters`: rosters adopted only through verified chains;
- :mod:`~fieldchat.device._membership`: the rosters we issue as founder or admin;
- :mod:`~fieldchat.device._keying`: entering epochs, our grants out, theirs in;
- :mod:`~fieldchat.device._sealer`: sealing, step reservations, parking at a stop;
- :mod:`~fieldchat.device._opener`: authenticating and opening envelopes;
- :mod:`~fieldchat.device._records` and :mod:`~fieldchat.device._loader`: the state
  in the key store, written and read back.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

from fieldchat.device._bundles import Bundles, BundleStatus, BundleUpdate
from fieldchat.device._conversation import (
    KEEP_EPOCHS,
    MAX_JOINING,
    ChainId,
    Conversations,
    Publication,
)
from fieldchat.device._coverage_loader import load_coverage
from fieldchat.device._epoch_requests import UPDATE_EPOCH_EVERY_S, EpochRequests
from fieldchat.device._keying import MAX_PENDING_GRANTS, GrantResult, Keying
from fieldchat.device._loader import load_state
from fieldchat.device._membership import Membership
from fieldchat.device._opener import Opened, Opener, Settlement
from fieldchat.device._rosters import MAX_ROSTER_CANDIDATES, RosterChains
from fieldchat.device._sealer import Sealer
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import KeyStore, MemoryKeyStore
from fieldchat.schemas import (
    Bundle,
    Control,
    ControlOp,
    Message,
    Policy,
    Receipt,
    Roster,
    Topics,
)
from fieldchat.schemas.envelope import Header
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.roster import is_roster

__all__ = [
    "KEEP_EPOCHS",
    "MAX_JOINING",
    "MAX_PENDING_GRANTS",
    "MAX_ROSTER_CANDIDATES",
    "UPDATE_EPOCH_EVERY_S",
    "BundleStatus",
    "BundleUpdate",
    "Engine",
    "GrantResult",
    "Opened",
    "Publication",
]

P = ParamSpec("P")
R = TypeVar("R")


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
        self._clock = clock
        self._random = random
        self.store: KeyStore = store if store is not None else MemoryKeyStore()
        self.topics = topics or Topics()
        self.counters: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._bundles = Bundles(identity.bundle, self.store)
        self._requests = EpochRequests(self._bundles.get)  # UPDATE/REKEY we answer (§6.7)
        self._conversations = Conversations(self.store, self.counters)
        self._convs = self._conversations.by_cid  # read by tests and benchmarks
        dirty: set[tuple[str, ChainId]] = set()
        self._rosters = RosterChains(self._conversations, self.store, self.counters)
        self._keying = Keying(
            identity,
            store=self.store,
            topics=self.topics,
            counters=self.counters,
            conversations=self._conversations,
            bundles=self._bundles,
            dirty=dirty,
            random=random,
        )
        self._membership = Membership(
            identity,
            topics=self.topics,
            conversations=self._conversations,
            bundles=self._bundles,
            rosters=self._rosters,
            keying=self._keying,
            clock=clock,
            random=random,
        )
        self._sealer = Sealer(
            identity, store=self.store, conversations=self._conversations, lock=self._lock
        )
        self._keying.seal = self._sealer.seal
        self._opener = Opener(
            identity.pid,
            store=self.store,
            counters=self.counters,
            conversations=self._conversations,
            dirty=dirty,
        )
        load_state(
            self.store,
            identity.pid,
            self._bundles.by_pid,
            self._bundles.verified,
            self._conversations,
        )
        self._opener.adopt_coverage(*load_coverage(self.store, self._conversations, self.counters))
        self._sealer.adopt_parked_cover(self.counters)

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
        return pid in self._bundles.verified

    @_counted
    def mark_verified(self, pid: str) -> None:
        """Record that ``pid``'s fingerprint was compared out of band.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        self._bundles.mark_verified(pid)

    @_counted
    def learn_bundle(self, data: bytes) -> BundleUpdate:
        """Accept a participant's bundle, trusting it on first use.

        A newer bundle with different keys is accepted (keys rotate) but reported
        as ``KEY_CHANGED`` so the caller warns loudly; the pid itself cannot change
        keys, it is the hash of the identity key.

        Raises:
            WireError, CryptoError: malformed or badly signed bundle.
        """
        return self._bundles.learn(data)

    # -- conversations ----------------------------------------------------------------

    def conversations(self) -> list[str]:
        return sorted(self._convs)

    def roster(self, cid: str) -> Roster:
        """The current roster of ``cid``.

        Raises:
            UnknownConversation: no state for ``cid``.
        """
        return self._conversations.joined(cid).roster

    def is_member(self, cid: str) -> bool:
        conv = self._convs.get(cid)
        return conv is not None and not conv.removed

    def sending_step(self, cid: str) -> int | None:
        """The next step of our sending chain in ``cid`` (None without one)."""
        with self._lock:
            conv = self._convs.get(cid)
            return None if conv is None or conv.send is None else conv.send.step

    def keyed(self, cid: str) -> bool:
        """Whether we can seal in ``cid`` now: a member whose current epoch's secret
        has arrived (until then :meth:`seal` raises EpochKeyPending, §6.6)."""
        with self._lock:
            conv = self._convs.get(cid)
            return conv is not None and not conv.removed and conv.send is not None

    def next_step(self, cid: str, epoch: int, sender_index: int, chain: int) -> int | None:
        """The step a receiving chain expects next; ``None`` before its grant arrives.

        Before any envelope of the chain was opened this is where its grant starts, so
        a client can tell that an early envelope overtook earlier ones.
        """
        with self._lock:
            return self._opener.next_step(cid, (epoch, sender_index, chain))

    def reach(self, cid: str, epoch: int, sender_index: int, chain: int) -> int | None:
        """The furthest step of a receiving chain an unsigned envelope can be tried at
        now (``None`` before its grant): one held as
        :class:`~schemas.errors.UnsignedJumpTooFar` is worth retrying once this passes
        its step (§6.4)."""
        with self._lock:
            return self._opener.reach(cid, (epoch, sender_index, chain))

    def authentic(self, cid: str, data: bytes, header: Header | None = None) -> bool | None:
        """Whether an envelope would authenticate now, changing no state: ``True`` or
        ``False``, or ``None`` when that cannot be told yet (no key, malformed, too far
        ahead to derive before authentication). Signed: its signature; unsigned: AES-GCM.

        A client that holds envelopes back for per-sender order asks this first, so
        that only genuine ones wait (several unsigned candidates may be served for one
        step: docs/gateway.md, "Receivers"). ``header``: ``data``'s, when the caller
        parsed it already.
        """
        with self._lock:
            return self._opener.authentic(cid, data, header)

    def peek_receipt(
        self, cid: str, data: bytes, header: Header | None = None
    ) -> tuple[str, Receipt] | None:
        """The sender and receipt inside an envelope that is held back for display
        order, changing no state; ``None`` unless it is a receipt that authenticates
        now. A gap request (a MISSING receipt) must be answered at once even when its
        sender's chain has a gap of its own here: held until that gap fills or is
        given up, the answer comes too late for the asker's reorder window.
        ``header``: ``data``'s, when the caller parsed it already."""
        with self._lock:
            return self._opener.peek_receipt(cid, data, header)

    def oldest_epoch(self, cid: str) -> int:
        """The oldest roster epoch of ``cid`` we can open anything of: the current one,
        or an older one we still hold a receiving chain of (0 when unknown)."""
        with self._lock:
            return self._opener.oldest_epoch(cid)

    def reservations_low(self, left: int) -> bool:
        """Whether a sending chain in use has ``left`` or fewer reserved steps unused.

        A chain not used since loading (none reserved in memory) is left alone: its
        first :meth:`seal` reserves, so an idle device does not skip steps at every
        start.
        """
        with self._lock:
            return self._sealer.reservations_low(left)

    @_counted
    def renew_reservations(self, left: int) -> int:
        """Reserve the next window of every sending chain in use with ``left`` or fewer
        reserved steps unused; how many chains.

        Lets a client persist (and fsync) reservations ahead of need, off its sending
        path, instead of in the :meth:`seal` that finds the window used up (§6.3).

        Raises:
            KeyStoreError: a reservation could not be persisted (none is adopted).
        """
        return self._sealer.renew_reservations(left)

    def owed_grants(self, cid: str) -> set[str]:
        """Members we still owe our chain to because their bundle is unknown."""
        return set(self._conversations.joined(cid).owed_to)

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
        return self._membership.create(members, policy=policy, admins=admins)

    @_counted
    def add_members(self, cid: str, pids: Sequence[str]) -> list[Publication]:
        """Invite members: a new epoch whose roster lists them (admins only).

        Raises:
            NotAMember: we are not an admin, or policy requires ML-KEM they lack.
            UnknownParticipant: a bundle has not been learned yet.
        """
        return self._membership.add(cid, pids)

    @_counted
    def remove_members(self, cid: str, pids: Sequence[str]) -> list[Publication]:
        """Remove members: a new epoch without them; every remaining member re-keys.

        Raises:
            NotAMember: we are not an admin of the current roster.
        """
        return self._membership.remove(cid, pids)

    @_counted
    def set_policy(self, cid: str, policy: Policy) -> list[Publication]:
        """Change the conversation policy (a new epoch, admins only)."""
        return self._membership.set_policy(cid, policy)

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
        grown = self._rosters.receive(data)
        return [] if grown is None else self._keying.follow_tip(grown)

    def awaiting_rosters(self) -> dict[str, int]:
        """Conversations whose rosters, deliveries or grants wait for missing epochs:
        cid -> the newest epoch of the verified chain held (-1: none yet, epoch 0 is
        missing)."""
        with self._lock:
            return self._rosters.awaiting()

    @_counted
    def pay_owed_grants(self, cid: str | None = None) -> list[Publication]:
        """Grants owed to members whose bundles have arrived since (all or one cid)."""
        return self._keying.pay_owed_grants(cid)

    # -- grants -----------------------------------------------------------------------

    @_counted
    def handle_inbox(self, data: bytes) -> GrantResult | list[Publication]:
        """Accept what arrived in our inbox: a delivery or a grant
        (:meth:`handle_grant`'s result) or a roster an inviting admin sent
        (:meth:`handle_roster`'s publications)."""
        return self._handle_roster(data) if is_roster(data) else self._keying.receive(data)

    @_counted
    def handle_grant(self, data: bytes) -> GrantResult:
        """Accept an epoch secret's delivery or a member's re-keyed chain (a grant)
        from our inbox; ``publications`` in the result are ours to publish (§6.5).

        Raises:
            WireError, CryptoError, WeakKey: malformed, forged or undecryptable.
            PrekeyUnknown: sealed to a prekey whose private keys are gone: ask for a
                new epoch (:meth:`request_epoch`).
            GrantRejected: not for us, from a non-member, for another roster or
                downgraded to X25519 for a post-quantum prekey.
        """
        return self._keying.receive(data)

    # -- prekeys, updates, re-keys (PROTOCOL.md §2.5, §6.2, §6.7) -------------------------

    @_counted
    def maintain_prekeys(self) -> list[Publication]:
        """Rotate the prekey when it is due (by time or by use) and delete superseded
        prekeys past their grace period; the new bundle to publish if it rotated.

        Raises:
            KeyStoreError: the new prekeys could not be persisted (nothing changed).
        """
        now = int(self._clock())
        rotated = self.identity.rotation_due(now)
        if rotated:
            self.identity.rotate(now, self._random)
        pruned = self.identity.prune(now)
        if rotated or pruned:
            self._keying.save_identity()
            self._bundles.by_pid[self.pid] = self.identity.bundle
        return [self.bundle_publication()] if rotated else []

    @_counted
    def update(self) -> list[Publication]:
        """Recover from a suspected copy of our state (§6.7): a new prekey (every older
        one deleted now), then a new epoch of each conversation we are in, keyed to it —
        issued by us where we are an admin, asked of an admin (UPDATE) elsewhere.

        Raises:
            KeyStoreError: the new prekey could not be persisted.
        """
        self.identity.rotate(int(self._clock()), self._random, drop_old=True)
        self._keying.save_identity()
        self._bundles.by_pid[self.pid] = self.identity.bundle
        prekey = self.identity.current.public
        out = [self.bundle_publication()]
        request = Control(op=ControlOp.UPDATE, prekey_id=prekey.id, prekey_digest=prekey.digest())
        for cid, conv in sorted(self._convs.items()):
            if conv.removed or not conv.joined:
                continue
            if conv.roster.is_admin(self.pid):
                out += self._membership.set_policy(cid, conv.roster.policy)
            elif conv.send is not None:
                out.append(Publication(self.topics.msg(cid), self._sealer.seal(cid, request)))
        return out

    @_counted
    def request_epoch(self, cid: str) -> bytes:
        """A REKEY control asking an admin for a new epoch (our delivery never came, or
        its prekey is gone); the envelope to publish.

        Raises:
            EpochKeyPending: we have no key of the current epoch to seal it with.
        """
        return self._sealer.seal(cid, Control(op=ControlOp.REKEY))

    @_counted
    def rekey_own_chain(self, cid: str) -> list[Publication]:
        """Our next chain of the current epoch, granted to every member (§6.2): after
        losing our sending state, without an admin.

        Raises:
            NotAMember: we have no sending chain in ``cid``.
        """
        return self._keying.rekey_own_chain(self._conversations.joined(cid))

    @_counted
    def answer_updates(self) -> list[Publication]:
        """As an admin: a new epoch for each conversation with an UPDATE or REKEY we
        can answer now, at most one every ``UPDATE_EPOCH_EVERY_S`` per conversation
        (:class:`~fieldchat.device._epoch_requests.EpochRequests` says which)."""
        out: list[Publication] = []
        for cid in self._requests.take(self._clock(), self._admin_in):
            out += self._membership.set_policy(cid, self._convs[cid].roster.policy)
        return out

    def epoch_requests_due(self) -> bool:
        """Whether :meth:`answer_updates` would answer something now (a request whose
        turn came while it waited, checked by the device every second)."""
        with self._lock:
            return self._requests.due(self._clock())

    def _admin_in(self, cid: str) -> bool:
        conv = self._convs.get(cid)
        return conv is not None and not conv.removed and conv.roster.is_admin(self.pid)

    def _on_control(self, opened: Opened) -> None:
        """ENDS (signed only) and UPDATE/REKEY controls, which the engine itself acts on."""
        message = opened.message
        assert isinstance(message, Control)
        conv = self._convs[opened.cid]
        if opened.forgeable_control:
            self.counters["unsigned_control"] += 1
            return
        if message.op is ControlOp.ENDS:
            self._keying.learn_ends(conv, opened.sender, message.ends)
            return
        if message.op in (ControlOp.UPDATE, ControlOp.REKEY) and (
            not conv.removed and conv.roster.is_admin(self.pid)
        ):
            want = (
                (message.prekey_id, message.prekey_digest)
                if message.op is ControlOp.UPDATE
                else None
            )
            if self._requests.ask(opened.cid, opened.sender, want, self._clock()):
                self.counters["epoch_request_deferred"] += 1

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
                return self._sealer.seal(cid, message)
            except FieldchatError as exc:
                self.counters[exc.reason] += 1
                raise

    def open(self, cid: str, data: bytes, header: Header | None = None) -> Opened | None:
        """Authenticate and decrypt an envelope of ``cid``.

        Returns ``None`` for a duplicate or our own envelope echoed by the broker.
        ``header``: ``data``'s, when the caller parsed it already (it is not parsed again).

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
                opened = self._opener.open(cid, data, header)
            except FieldchatError as exc:
                self.counters[exc.reason] += 1
                raise
            if opened is not None and type(opened.message) is Control:
                self._on_control(opened)
            return opened

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
        with self._lock:
            jobs = self._opener.signature_jobs(envelopes)
        if len(jobs) < 2:  # nothing to share between two threads
            return 0
        verified = Opener.verify_shared(jobs, executor)
        with self._lock:
            self._opener.remember_verified(verified)
        return len(verified)

    def leave(self, cid: str) -> bytes:
        """A sealed LEAVE control: admins remove us in the next epoch on receipt."""
        return self.seal(cid, Control(op=ControlOp.LEAVE))

    def take_settled(self) -> list[Settlement]:
        """Pending unsigned messages settled since the last call (PROTOCOL.md §6.5):
        verified, or forged by another member; oldest first."""
        with self._lock:
            return self._opener.take_settled()

    @_counted
    def flush(self) -> None:
        """Persist receiving-chain state changed since the last flush (batched writes)."""
        self._opener.flush()

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
            return self._sealer.park()
