"""The device: the E2E engine on an MQTT link with a durable outbox.

    app threads ──send()──▶ seal + outbox row (one commit) ──▶ worker ──▶ paho
    paho thread ──message/ack──▶ queue ──▶ worker: open + store + ack, in batches

Delivery (DESIGN.md, Delivery): a message is durable before :meth:`Device.send`
returns (against a crash of the process; with ``power_safe`` against a power cut
too, see :mod:`fieldchat.device.state`) and leaves in outbox order whenever a connection is
up; rows are deleted only when the broker acknowledges them, so a crash or a lost
connection means publishing again, never losing. Receivers commit every message (deduplicated on
``(cid, epoch, sender, chain, step)``) *before* sending the PUBACK, so the broker
redelivers what a crash interrupted and the screen still shows it once. Because a
broker may acknowledge and then lose a message (Mosquitto between snapshots, aMQTT
in flight), own messages keep their ciphertext until every member has receipted
them, and those not receipted are published again after a reconnect.

Only the worker thread mutates the link-side state; every engine call that may
write happens inside a :meth:`DeviceState.transaction` so the engine's records
commit atomically with the client's rows (and locks are always taken state first,
then engine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fieldchat.device.chains import RESERVE_STEPS
from fieldchat.device.config import BrokerOptions, LinkOptions
from fieldchat.device.engine import BundleStatus, Engine, Opened, Publication
from fieldchat.device.events import (
    Connected,
    Disconnected,
    Event,
    GapDetected,
    Joined,
    KeyChanged,
    MessageReceived,
    ReceiptReceived,
    Removed,
)
from fieldchat.device.link import Connection, Link, Refusal, Will
from fieldchat.device.reconcile import (
    ARCHIVE_AGAIN_S,
    ARCHIVE_ROUND,
    ARCHIVE_SETTLE_S,
    Outcome,
    Reconciling,
    reconcile,
    tail_marks,
)
from fieldchat.device.refusals import refuse
from fieldchat.device.repair import (
    ASK_FRACTIONS,
    MAX_REPAIR_PER_REQUEST,
    ChainKey,
    GapAsks,
    Repairs,
    StepKey,
    lacking,
)
from fieldchat.device.state import REFUSED, DeviceState, Gap, OutboxRow, ReceivedRow, SentRow
from fieldchat.schemas import (
    Control,
    ControlOp,
    Grant,
    Policy,
    Receipt,
    ReceiptRange,
    ReceiptType,
    TextMessage,
    Topics,
    tracing,
)
from fieldchat.schemas.envelope import EnvelopeKind, read_header
from fieldchat.schemas.errors import (
    ConnectFailed,
    FieldchatError,
    KeyStoreError,
    MissingKey,
    NotAuthorized,
    RosterPending,
    TransportError,
    UnknownConversation,
    UnknownParticipant,
    UnsignedJumpTooFar,
)
from fieldchat.schemas.frame import MAX_FRAME_BYTES, pack_frame, part_bytes, split
from fieldchat.schemas.messages import MAX_RECEIPT_RANGES
from fieldchat.schemas.roster import is_roster
from fieldchat.schemas.topics import DEFAULT_PREFIX, Topic, TopicKind

__all__ = ["ConversationInfo", "Device", "HistorySource", "SentMessage"]

log = logging.getLogger("fieldchat.device")

MAX_QUEUE = 10_000  # inbound packets waiting for the worker; paho's thread blocks past it
BATCH = 256  # inbound packets per transaction (one fsync)
MAX_RESEND = 2_000  # own messages published again per reconnect
# Distinct candidates of one step held for display order (unsigned junk beside the
# genuine envelope; only those not refused by an authentication check wait).
MAX_CANDIDATES_PER_STEP = 8
# Gap requests answered while held, remembered so their turn does not answer again.
MAX_ANSWERED_EARLY = 4_096
# A new member's grant: what it has not receipted this many receipt intervals later
# is published again (it may have subscribed after we sent).
GRANT_RESEND_RECEIPTS = 3
MAX_TOPICS_PARSED = 1_024  # parsed topic names kept (a device sees few distinct ones)
# The worker reserves a chain's next steps (and fsyncs) once this few are left, so a
# send rarely finds its window used up and waits for that fsync itself.
RENEW_WHEN_LEFT = RESERVE_STEPS // 2
# Tail checks (Device._tail): pages of this many envelopes, at most TAIL_PAGES per
# conversation a round; rounds wait for TAIL_QUIET_S without inbound messages (a
# reconnect's queued backlog arrives first) and follow each other TAIL_AGAIN_S apart
# while the gateway has more, else LinkOptions.history_tail_s apart.
TAIL_PAGE = 500
TAIL_PAGES = 4
TAIL_QUIET_S = 0.5
TAIL_AGAIN_S = 1.0
TAIL_CURSOR = "history_after/"  # meta key prefix: the history source's cursor per cid
MAX_GAPS_FOR_TAIL = 1_024  # expired gaps the next tail round still names the chain below
# Rosters a chain waits for (PROTOCOL.md §5.2) are fetched from the history source at
# most this often per conversation: a gateway that lacks them is not asked in a loop.
ROSTER_FETCH_AGAIN_S = 5.0
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
_TICK_S = 0.05
_ENVELOPE_ROWS = ("msg", "receipt")  # outbox rows on c/{cid}/msg: what frames carry
_PUBLISH_OVERHEAD = 32  # a PUBLISH's bytes besides topic and payload, generously (MQTT 5)


class HistorySource(Protocol):
    """Where missing envelopes are asked for: the gateway's history API
    (:class:`device.history.GatewayHistory`).

    ``since`` returns one page archived for a conversation after a cursor the device
    keeps durably, per conversation: the one way the device fetches (tail rounds, gap
    fills, a join's backfill), so nothing is fetched twice across restarts. The
    device opens what it gets like live messages: duplicates and forgeries cost
    nothing. ``from_epoch``: the oldest roster epoch the device holds keys of; a source
    may skip what was archived before it began (the device could not open it).

    ``rosters`` returns the conversation's archived rosters, oldest epoch first: a
    roster that does not chain to those the device holds waits for them (PROTOCOL.md
    §5.2); the engine checks every one, so a wrong answer costs a check, not trust.
    """

    def since(
        self, cid: str, after: int, limit: int, *, from_epoch: int = 0
    ) -> tuple[list[bytes], int, bool]: ...

    def rosters(self, cid: str, *, from_epoch: int = 0) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class SentMessage:
    """An own message, durable in the outbox: ``id`` in ``sent``, its chain position."""

    id: int
    cid: str
    epoch: int
    chain: int
    step: int


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    cid: str
    epoch: int
    members: tuple[str, ...]
    admins: tuple[str, ...]
    member: bool
    policy: Policy | None


@dataclass(frozen=True, slots=True)
class _Up:
    conn: Connection
    session_present: bool


@dataclass(frozen=True, slots=True)
class _Down:
    conn: Connection
    reason: str


@dataclass(frozen=True, slots=True)
class _Msg:
    conn: Connection
    mid: int
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True, slots=True)
class _Acked:
    conn: Connection
    mid: int
    refusal: Refusal | None  # a negative PUBACK (MQTT 5)


@dataclass(frozen=True, slots=True)
class _Refused:
    conn: Connection
    topics: list[str]


@dataclass(frozen=True, slots=True)
class _Wake:
    pass


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class _Fetched:
    """What the history thread fetched for ``cid``, opened on the worker.

    ``cursor`` (a meta key and value) is saved once the envelopes are committed, so a
    crash fetches the page again (deduplicated) rather than skipping it;
    ``next_tail`` ends a tail round: seconds until the next.
    """

    cid: str
    envelopes: list[bytes]
    cursor: tuple[str, str] | None = None
    error: str | None = None
    next_tail: float | None = None
    rosters: list[bytes] | None = None  # the answer to a roster fetch


@dataclass(frozen=True, slots=True)
class _Archived:
    """What a reconciliation round with the archive found (``more``: it had a full
    round of own envelopes to name: the next comes soon)."""

    outcome: Outcome
    more: bool


_Item = _Up | _Down | _Msg | _Acked | _Refused | _Wake | _Stop | _Fetched | _Archived


@dataclass(slots=True)
class _Batch:
    """Side effects of one worker transaction, applied after it commits."""

    acks: list[tuple[Connection, int]]
    events: list[Event]
    subscribe: set[str]
    unsubscribe: set[str]
    retry_held: bool = False
    joined: bool = False  # a conversation joined: its archive comes in a tail round


class Device:
    """One participant on an MQTT broker.

    Args:
        state: the state file (path or an open :class:`DeviceState`).
        broker: where to connect and with which credential.
        link: timing, batching and low-bandwidth tuning.
        prefix: topic prefix shared by every participant of a deployment.
        on_event: called on the worker thread for each :mod:`fieldchat.device.events` event.
        history: where to ask for missing ranges (the gateway, later).
        post_quantum: whether a new identity gets an ML-KEM-768 key.
        power_safe: :meth:`send` returns only once its messages survive a power cut
            (one fsync per call); by default they survive a crash of the process
            at once and a power cut from the next fsync on (see :mod:`fieldchat.device.state`).

    Raises:
        KeyStoreError: the state file cannot be opened or is corrupt.
    """

    def __init__(  # noqa: PLR0915 - one statement per attribute
        self,
        state: DeviceState | str | os.PathLike[str],
        broker: BrokerOptions | None = None,
        *,
        link: LinkOptions | None = None,
        prefix: str = DEFAULT_PREFIX,
        on_event: Callable[[Event], None] | None = None,
        history: HistorySource | None = None,
        post_quantum: bool = True,
        power_safe: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state if isinstance(state, DeviceState) else DeviceState(Path(state))
        self.power_safe = power_safe
        self.broker = broker or BrokerOptions()
        self.options = link or LinkOptions()
        self.topics = Topics(prefix)
        self.on_event = on_event
        self.history = history
        self._clock = clock
        with self.state.transaction():
            self.engine = Engine.open_store(
                self.state, topics=self.topics, post_quantum=post_quantum
            )
        self.counters: Counter[str] = Counter()
        self._tracer = tracing.tracer("device")  # docs/tracing.md; None when off
        self._queue: queue.Queue[_Item] = queue.Queue(MAX_QUEUE)
        self._send_lock = threading.Lock()
        self._receipts_lock = threading.Lock()  # never held while taking another lock
        self._subs_lock = threading.Lock()
        self._subs: set[str] = set()
        self._subs_pending: set[str] = set()  # subscribed after the next outbox pump
        self._refused: dict[str, float] = {}  # topic -> when to subscribe again
        self._changed = threading.Condition()
        self._bundle_seen: set[str] = set()
        self._conn: Connection | None = None
        self._inflight: dict[int, tuple[int, ...]] = {}  # packet id -> outbox seqs it carries
        self._cursor = 0
        self._high = self.state.high_steps()
        # Envelopes that overtook a missing step: chain -> step -> [(held row, deadline)],
        # every distinct candidate of a step that did not fail to authenticate (history
        # may serve junk beside the genuine envelope: docs/gateway.md, "Receivers").
        self._waiting: dict[tuple[str, int, int, int], dict[int, list[tuple[int, float]]]] = (
            defaultdict(dict)
        )
        # Held unsigned envelopes too far ahead to derive before authentication
        # (UnsignedJumpTooFar): chain -> step -> held row, retried once Engine.reach
        # passes them, never in the wholesale retry (each costs up to ~1 ms to try).
        self._unreached: dict[tuple[str, int, int, int], dict[int, list[int]]] = defaultdict(dict)
        self._advanced: set[tuple[str, int, int, int]] = set()  # chains to look at again
        self._roster_fetches: dict[str, float] = {}  # cid -> when it may be fetched again
        self._retried_at_start = False
        for row, cid, payload, until in self.state.held(reordering=True):
            with contextlib.suppress(FieldchatError):
                _, _, epoch, index, chain, step, _ = read_header(payload)
                waiting = self._waiting[(cid, epoch, index, chain)]
                waiting.setdefault(step, []).append((row, until or 0.0))
        self._receipts: dict[tuple[str, ReceiptType], set[tuple[int, int, int, int]]] = defaultdict(
            set
        )
        # Gap requests (PROTOCOL.md §4.1): which held chains to ask for their missing
        # steps and when; which steps others asked us for to publish again. Made again
        # in start(): the reorder window is read from the options then.
        self._asks = GapAsks(self.options.reorder_window_s)
        self._repairs = Repairs(self.options.reorder_window_s * ASK_FRACTIONS[1])
        # Gap requests answered while held behind a gap (not answered again in turn).
        self._answered_early: set[StepKey] = set()
        self._next_receipts = 0.0
        self._resend: tuple[float, float] | None = None  # (due, published before)
        # (cid, member whose grant arrived) -> when to resend what it has not receipted.
        self._grant_resends: dict[tuple[str, str], float] = {}
        self._next_housekeeping = 0.0
        self._next_tail: float | None = None  # the next tail check; None before connecting
        self._tail_running = False  # a tail round is with the history thread
        # A round asked for by a gap or a join (since the last one started): it does not
        # wait for a quiet link, and follows at once a round that was running.
        self._tail_asked = False
        # Gaps dropped after gap_timeout_s: the next tail round still names the chain
        # below them (tail_marks), so the archive sends what they lacked.
        self._gaps_for_tail: list[Gap] = []
        self._gap_tail_after = 0.0  # a gap may start a tail round from then on
        # Reconciling own envelopes with the archive (device.reconcile): the next
        # round, None when none is planned (without a gateway, never).
        self._archive_due: float | None = None
        self._archive_running = False
        # After a connect the first round waits for the outbox to drain, until this.
        self._archive_drain_until = 0.0
        # History requests (HTTP, seconds on a slow link) run on a thread of their own:
        # the worker goes on sending and showing live messages meanwhile.
        self._history_jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._history_thread: threading.Thread | None = None
        self._last_inbound = 0.0  # when the last message batch arrived
        self._fatal: KeyStoreError | None = None
        self._topics_parsed: dict[str, Topic] = {}
        # Checks half of each received batch's signatures beside the worker (the
        # thread starts on first use; see Engine.preverify).
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="fieldchat-verify")
        # PUBACKs of committed batches waiting for the fsync that makes them power-safe:
        # (state generation to reach, acks). The fsync runs on its own thread so the
        # worker opens and shows the next messages meanwhile (see _send_acks).
        self._unacked: deque[tuple[int, list[tuple[Connection, int]]]] = deque()
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fieldchat-sync")
        self._syncing: Future[None] | None = None
        self._worker: threading.Thread | None = None
        self._link: Link | None = None
        self._closed = False
        self._init_subscriptions()

    # -- identity ---------------------------------------------------------------------

    @property
    def pid(self) -> str:
        return self.engine.pid

    def fingerprint(self, pid: str | None = None) -> str:
        """Our fingerprint, or a known participant's.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        if pid is None or pid == self.pid:
            return self.engine.identity.fingerprint()
        bundle = self.engine.bundle_of(pid)
        if bundle is None:
            raise UnknownParticipant(f"no bundle known for {pid}: it has not connected yet")
        return bundle.fingerprint()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Device:
        """Start the worker and the link (connects in the background).

        Raises:
            ConfigError: another process is using the same state file.
        """
        if self._worker is not None:
            return self
        self.state.lock()
        self.state.checkpoint_in_background()
        self._asks = GapAsks(self.options.reorder_window_s)
        self._repairs = Repairs(self.options.reorder_window_s * ASK_FRACTIONS[1])
        now = self._clock()
        for key in self._waiting:  # what a previous run held is asked for at once
            self._lacking(key, now)
        self._worker = threading.Thread(target=self._work, name="fieldchat-device", daemon=True)
        self._worker.start()
        protocol = self.state.get_meta("protocol") if self.broker.protocol == "auto" else None
        self._link = Link(
            self.pid,
            self.broker,
            self.options,
            self,
            will=Will(self.topics.status(self.pid), STATUS_OFFLINE),
            protocol=protocol,
            on_protocol=lambda p: self.state.set_meta({"protocol": p}),
        )
        self._link.farewell = lambda conn: conn.publish_status(
            self.topics.status(self.pid), STATUS_OFFLINE
        )
        self._link.start()
        return self

    def close(self) -> None:
        """Stop the link (clean disconnect), the worker, and close the state file."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            self._link.stop()
        if self._worker is not None:
            self._queue.put(_Stop())
            self._worker.join(10)
            self._worker = None
        self._history_jobs.put(None)  # its thread is a daemon: a request in flight is dropped
        self._verifier.shutdown()
        self._syncer.shutdown()
        try:
            with self.state.transaction():
                self._flush_receipts()
                self.engine.flush()
            # The next start resumes at the first unused step: no jump for receivers.
            self.engine.park()
            self.state.sync()
        except FieldchatError as exc:
            log.warning("could not save state on close: %s", exc)
        self.state.close()

    def __enter__(self) -> Device:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def protocol(self) -> str | None:
        conn = self._conn
        return conn.protocol if conn else None

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until connected.

        Raises:
            NotAuthorized: the broker refused our credential.
            ConnectFailed: not connected within ``timeout`` (the last reason).
        """
        end = time.monotonic() + timeout
        with self._changed:
            while self._conn is None:
                error = self._link.last_error if self._link else None
                if isinstance(error, NotAuthorized):
                    raise error
                left = end - time.monotonic()
                if left <= 0:
                    if error is not None:
                        raise type(error)(str(error))
                    where = ", ".join(f"{h}:{p}" for h, p in self.broker.addresses)
                    raise ConnectFailed(f"no connection to {where} in {timeout:g} s")
                self._changed.wait(min(left, 0.1))
        self._raise_fatal()

    def wait_drained(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged the whole outbox; whether it did."""
        end = time.monotonic() + timeout
        with self._changed:
            while self.state.outbox_count():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (checked whenever the worker made progress)."""
        end = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    # -- sending ----------------------------------------------------------------------

    def send(self, cid: str, text: str) -> SentMessage:
        """Seal ``text`` for ``cid`` and make it durable; it leaves as soon as it can.

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
            LimitExceeded: the text is too long.
            KeyStoreError: the state file could not be written (nothing was queued).
        """
        return self.send_many(cid, [text])[0]

    def send_many(self, cid: str, texts: Sequence[str]) -> list[SentMessage]:
        """Like :meth:`send` for several texts, in one transaction.

        The rows commit without an fsync: durable against a crash of the process
        (SIGKILL included) when this returns, and published at once. An fsync (one
        for the whole batch, outside the state file's lock, shared with concurrent
        callers) happens before returning only when the batch wrote a chain
        reservation (one send in ``RESERVE_STEPS``; nothing sealed under it is
        published before) or, with ``power_safe``, always (and the worker publishes
        nothing before it): then a power cut loses nothing ``send`` returned.

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
            LimitExceeded: a text is too long (none of them was queued).
            KeyStoreError: the state file could not be written (nothing was queued)
                or synced (queued, not known durable: the device stops).
        """
        self._raise_fatal()
        topic = self.topics.msg(cid)
        out = []
        with (
            self._send_lock,
            self.state.transaction(durable=False, sync_outbox=self.power_safe) as db,
        ):
            for text in texts:
                now = self._clock()
                envelope = self.engine.seal(cid, TextMessage(sent_at=int(now), text=text))
                _, _, epoch, index, chain, step, _ = read_header(envelope)
                seq = self.state.add_outbox(db, topic, envelope, cid=cid, what="msg")
                row = self.state.add_sent(
                    db, cid, epoch, index, chain, step, text, topic, envelope, seq
                )
                out.append(SentMessage(row, cid, epoch, chain, step))
            reserved = self.state.reserving
        self._wake()
        if self.power_safe or reserved:
            try:
                self.state.sync()
            except KeyStoreError as exc:
                self._fatal = exc  # the worker publishes nothing it cannot sync either
                raise
        return out

    def mark_read(self, cid: str) -> int:
        """Mark received texts of ``cid`` read; queue read receipts. How many."""
        with self.state.transaction() as db:
            keys = self.state.mark_read(db, cid)
        if self.options.read_receipts and keys:
            with self._receipts_lock:
                self._receipts[(cid, ReceiptType.READ)].update(keys)
        return len(keys)

    # -- conversations ----------------------------------------------------------------

    def fetch_bundles(self, pids: Iterable[str], timeout: float = 10.0) -> None:
        """Learn the bundles of ``pids`` (retained on ``p/{pid}/bundle``).

        Raises:
            UnknownParticipant: a bundle did not arrive in time.
        """
        missing = [p for p in dict.fromkeys(pids) if self.engine.bundle_of(p) is None]
        if not missing:
            return
        self._subscribe([self.topics.bundle(p) for p in missing])
        self.wait_for(lambda: all(self.engine.bundle_of(p) for p in missing), timeout)
        absent = [p for p in missing if self.engine.bundle_of(p) is None]
        if absent:
            raise UnknownParticipant(
                f"no bundle for {absent[0]} within {timeout:g} s: has that device "
                f"connected to this broker once?"
            )

    def create_conversation(
        self,
        members: Sequence[str] = (),
        *,
        policy: Policy | None = None,
        timeout: float = 10.0,
    ) -> str:
        """Found a conversation with ``members``; its cid (roster and grants queued).

        Raises:
            UnknownParticipant: a member's bundle could not be fetched.
        """
        self.fetch_bundles(members, timeout)
        with self.state.transaction() as db:
            cid, pubs = self.engine.create_conversation(members, policy=policy)
            self._queue_publications(db, pubs, cid)
        self._follow(cid)
        return cid

    def invite(self, cid: str, pids: Sequence[str], *, timeout: float = 10.0) -> None:
        """Add members (admins only): a new epoch listing them, keys granted.

        Raises:
            UnknownConversation, NotAMember: no such conversation, or we are no admin.
            UnknownParticipant: a bundle could not be fetched.
        """
        self.engine.roster(cid)
        self.fetch_bundles(pids, timeout)
        with self.state.transaction() as db:
            self._queue_publications(db, self.engine.add_members(cid, pids), cid)
        self._follow(cid)

    def remove(self, cid: str, pids: Sequence[str]) -> None:
        """Remove members (admins only): a new epoch, every remaining member re-keys.

        Raises:
            UnknownConversation, NotAMember: no such conversation, or we are no admin.
        """
        with self.state.transaction() as db:
            self._queue_publications(db, self.engine.remove_members(cid, pids), cid)
        self._wake()

    def set_policy(self, cid: str, policy: Policy) -> None:
        """Change the conversation's policy (admins only, a new epoch)."""
        with self.state.transaction() as db:
            self._queue_publications(db, self.engine.set_policy(cid, policy), cid)
        self._wake()

    def leave(self, cid: str) -> None:
        """Leave ``cid``: an admin removes us from the next epoch.

        An admin leaving publishes that roster itself (handing admin on if needed).

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
        """
        roster = self.engine.roster(cid)
        with self.state.transaction() as db:
            if roster.is_admin(self.pid) and len(roster.pids) > 1:
                pubs = self.engine.remove_members(cid, [self.pid])
                self._queue_publications(db, pubs, cid)
            else:
                self._queue_own(db, cid, self.engine.leave(cid), "msg")
        self._wake()

    def conversations(self) -> list[ConversationInfo]:
        out = []
        for cid in self.engine.conversations():
            try:
                roster = self.engine.roster(cid)
            except UnknownConversation:
                out.append(ConversationInfo(cid, -1, (), (), member=False, policy=None))
                continue
            out.append(
                ConversationInfo(
                    cid,
                    roster.epoch,
                    roster.pids,
                    tuple(m.pid for m in roster.members if m.admin),
                    member=self.engine.is_member(cid),
                    policy=roster.policy,
                )
            )
        return out

    def verify(self, pid: str, fingerprint: str) -> bool:
        """Compare ``pid``'s fingerprint with one read out of band; mark it verified.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        known = self.fingerprint(pid)
        if _digits(known) != _digits(fingerprint):
            return False
        with self.state.transaction():
            self.engine.mark_verified(pid)
        return True

    # -- local views ------------------------------------------------------------------

    def outbox(self) -> list[OutboxRow]:
        return self.state.outbox_from(0, 1_000_000)

    def messages(self, cid: str | None = None, *, after_id: int = 0) -> list[ReceivedRow]:
        return self.state.received(cid, after_id=after_id)

    def sent(self, cid: str | None = None) -> list[SentRow]:
        return self.state.sent(cid)

    @property
    def receipts_pending(self) -> bool:
        """Whether receipts wait for the next batch (``receipt_interval_s``)."""
        with self._receipts_lock:
            return any(self._receipts.values())

    def undelivered(self, cid: str) -> int:
        """Own messages of the current epoch some current member has not receipted yet."""
        roster = self.engine.roster(cid)
        missing: set[bytes] = set()
        for pid in roster.pids:
            if pid != self.pid:
                missing |= {p for _, p in self.state.unreceipted(cid, roster.epoch, pid, 100_000)}
        return len(missing)

    def gaps(self, cid: str | None = None) -> list[Gap]:
        return self.state.gaps(cid)

    # -- the link handler (paho thread: enqueue only) ----------------------------------

    def link_connected(self, conn: Connection, session_present: bool) -> None:
        self._queue.put(_Up(conn, session_present))

    def link_message(
        self, conn: Connection, mid: int, topic: str, payload: bytes, qos: int
    ) -> None:
        self._queue.put(_Msg(conn, mid, topic, payload, qos))

    def link_published(self, conn: Connection, mid: int, refusal: Refusal | None) -> None:
        self._queue.put(_Acked(conn, mid, refusal))

    def link_disconnected(self, conn: Connection, reason: str) -> None:
        self._queue.put(_Down(conn, reason))

    def link_refused(self, conn: Connection, topics: list[str]) -> None:
        self._queue.put(_Refused(conn, topics))

    def link_failed(self, error: TransportError) -> None:  # noqa: ARG002 - read via the link
        with self._changed:
            self._changed.notify_all()

    # -- the worker -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            items: list[_Item] = []
            with contextlib.suppress(queue.Empty):
                items.append(self._queue.get(timeout=_TICK_S))
            while items and len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(isinstance(item, _Stop) for item in items)
            try:
                self._process(items)
                self._send_acks()
                if not stop:
                    self._pump()
                    self._tick()
            except KeyStoreError as exc:
                log.critical("state file failure, the device stops: %s", exc)
                self._fatal = exc
                if self._link is not None:
                    threading.Thread(target=self._link.stop, daemon=True).start()
                stop = True
            except Exception:  # the worker must not die with the device still open
                log.exception("device worker error")
            with self._changed:
                self._changed.notify_all()
            if stop:
                return

    def _process(self, items: list[_Item]) -> None:
        batch = _Batch([], [], set(), set())
        pending: list[_Msg | _Acked] = []
        for item in items:
            if isinstance(item, (_Msg, _Acked)):
                pending.append(item)
                if isinstance(item, _Msg):
                    self._last_inbound = self._clock()
            elif isinstance(item, _Refused):
                # The broker may learn our membership (from the roster) only after our
                # SUBSCRIBE: try again soon, while we still want the topic.
                for topic in item.topics:
                    self._refused[topic] = self._clock() + 1.0
                    self.counters["subscribe_refused"] += 1
            elif isinstance(item, (_Up, _Down)):
                self._commit(pending, batch)
                pending = []
                self._control(item, batch)
            elif isinstance(item, _Fetched):
                self._commit(pending, batch)
                pending = []
                self._on_fetched(item)
            elif isinstance(item, _Archived):
                self._on_archived(item)
        self._commit(pending, batch)
        self._after(batch)

    def _commit(self, items: list[_Msg | _Acked], batch: _Batch) -> None:
        if not items:
            return
        envelopes = []
        for item in items:
            if isinstance(item, _Msg):
                parsed = self._parse(item.topic)
                if parsed is not None and parsed.kind is TopicKind.MSG and parsed.cid:
                    with contextlib.suppress(FieldchatError):  # counted by _on_message
                        envelopes += [(parsed.cid, e) for e in split(item.payload)]
        if len(envelopes) > 1:
            self.engine.preverify(envelopes, self._verifier)
        acked: list[int] = []
        # No fsync here: the batch is shown once committed (a process crash keeps it)
        # and made power-safe by one sync() before its PUBACKs leave (_after).
        with self.state.transaction(durable=False) as db:
            for item in items:
                if isinstance(item, _Msg):
                    self._on_message(db, item.topic, item.payload, batch)
                    if item.qos:
                        batch.acks.append((item.conn, item.mid))
                    continue
                if item.conn is not self._conn:
                    continue
                seqs = self._inflight.pop(item.mid, None)
                if seqs is None:
                    continue
                if item.refusal is not None:  # never published again (device/refusals.py)
                    self.counters["refused_by_broker"] += len(seqs)
                    batch.events.append(refuse(db, seqs, item.refusal))
                    continue
                acked += seqs
            if acked:
                self.state.acknowledged(db, acked, self._clock())
            self.engine.flush()

    def _after(self, batch: _Batch) -> None:
        # Shown once committed: a restarted process finds them stored and drops the
        # broker's redelivery, so each is shown once.
        for event in batch.events:
            self._emit(event)
        # Acknowledged only once durable: after a power cut the broker still has them.
        if batch.acks:
            self._unacked.append((self.state.generation, batch.acks))
            self._send_acks()
        if batch.subscribe:
            self._subscribe(sorted(batch.subscribe))
        if batch.unsubscribe:
            with self._subs_lock:
                self._subs -= batch.unsubscribe
            current = self._conn
            if current is not None:
                current.unsubscribe(sorted(batch.unsubscribe))
        if batch.retry_held:
            self._retry_held()
        if batch.joined:
            self._backfill()

    def _send_acks(self) -> None:
        """PUBACK, in order, what an fsync has made power-safe; start one for the rest.

        One fsync at a time covers every batch committed before it started (group
        commit), and the worker does not wait for it: under a busy disk a slow fsync
        delays PUBACKs, not the next messages on screen.

        Raises:
            KeyStoreError: a background fsync failed (the device stops).
        """
        if self._fatal is not None:
            raise self._fatal
        synced = self.state.synced_generation
        while self._unacked and self._unacked[0][0] <= synced:
            _, acks = self._unacked.popleft()
            for conn, mid in acks:
                if conn.connected:
                    conn.ack(mid)
        if self._unacked and (self._syncing is None or self._syncing.done()):
            self._syncing = self._syncer.submit(self._sync_for_acks)

    def _sync_for_acks(self) -> None:
        try:
            self.state.sync()
        except KeyStoreError as exc:
            self._fatal = exc  # raised on the worker by _send_acks
        self._wake()

    def _control(self, item: _Up | _Down, batch: _Batch) -> None:
        conn = item.conn
        if isinstance(item, _Up):
            self._conn = conn
            self._inflight = {}
            self._cursor = 0
            conn.publish(
                self.topics.bundle(self.pid), self.engine.identity.bundle.to_bytes(), retain=True
            )
            conn.publish_status(self.topics.status(self.pid), STATUS_ONLINE)
            # Outbox first (a new conversation's roster), then SUBSCRIBE: a broker that
            # learns membership from rosters then already knows us (same connection,
            # packets processed in order).
            self._refused.clear()
            self._pump()
            with self._subs_lock:
                self._subs_pending.clear()
                topics = sorted(self._subs)
            conn.subscribe(topics, no_local=[t for t in topics if t.endswith("/msg")])
            now = self._clock()
            self._hold_again(now)
            if self._link is not None and self._link.connects > 1:
                self._resend = (now + self.options.resend_after_s, now)
            self._next_tail = now  # once the backlog the broker kept has arrived
            if self._archive is not None:  # once the outbox drained and settled
                self._archive_due = now + ARCHIVE_SETTLE_S
                self._archive_drain_until = now + self.options.archive_check_s
            if not self._retried_at_start:
                # What a previous run held (a key, a chain end, a far step) is tried once
                # with this run's state; and chains that wait for rosters are fetched.
                self._retried_at_start = True
                batch.retry_held = True
                for cid, have in self.engine.awaiting_rosters().items():
                    self._fetch_rosters(cid, have)
            self.counters["connects"] += 1
            batch.events.append(Connected(conn.protocol, item.session_present))
            log.info(
                "connected (MQTT %s, session %s)",
                conn.protocol,
                "resumed" if item.session_present else "new",
            )
        elif conn is self._conn:
            self._conn = None
            self._inflight = {}
            batch.events.append(Disconnected(item.reason))
            log.info("disconnected: %s", item.reason)

    # -- inbound ----------------------------------------------------------------------

    def _parse(self, topic: str) -> Topic | None:
        """The parsed topic name (cached: the same few names carry every message)."""
        parsed = self._topics_parsed.get(topic)
        if parsed is None:
            try:
                parsed = self.topics.parse(topic)
            except FieldchatError:
                return None
            if len(self._topics_parsed) >= MAX_TOPICS_PARSED:
                self._topics_parsed.clear()
            self._topics_parsed[topic] = parsed
        return parsed

    def _on_message(
        self, db: sqlite3.Connection, topic: str, payload: bytes, batch: _Batch
    ) -> None:
        parsed = self._parse(topic)
        if parsed is None:
            self.counters["foreign_topic"] += 1
            return
        try:
            if parsed.kind is TopicKind.MSG:
                assert parsed.cid is not None
                for envelope in split(payload):  # a frame's envelopes each stand alone
                    try:
                        self._open(db, parsed.cid, envelope, batch)
                    except KeyStoreError:
                        raise
                    except FieldchatError as exc:
                        self.counters[f"rejected_{exc.reason}"] += 1
                        log.debug("rejected an envelope on %s: %s", topic, exc)
            elif parsed.kind is TopicKind.ROSTER:
                self._on_roster(db, payload, batch)
            elif parsed.kind is TopicKind.INBOX and is_roster(payload):
                self._on_roster(db, payload, batch)  # an inviting admin's earlier rosters
            elif parsed.kind is TopicKind.INBOX:
                self._on_grant(db, payload, batch)
            elif parsed.kind is TopicKind.BUNDLE:
                self._on_bundle(db, payload, batch)
        except KeyStoreError:
            raise
        except FieldchatError as exc:
            self.counters[f"rejected_{exc.reason}"] += 1
            log.debug("rejected %s: %s", topic, exc)

    def _open(
        self,
        db: sqlite3.Connection,
        cid: str,
        payload: bytes,
        batch: _Batch,
        *,
        in_order: bool = True,
    ) -> bool:
        """Open and store an envelope, then any held ones it lets through, in step order.

        With ``in_order``, an envelope more than one step ahead of its sender's chain is
        held (up to ``reorder_window_s``) for the missing steps to arrive first: brokers
        may reorder a redelivered backlog, and the screen keeps each sender's order.
        False when it must wait for a key.
        """
        if in_order:
            try:
                kind, _, epoch, index, chain, step, _ = read_header(payload)
            except FieldchatError:
                pass  # the engine rejects and counts it below
            else:
                key = (cid, epoch, index, chain)
                high = self._high_of(key)
                if high is not None and key not in self._high:
                    # Shown through the step before the grant's first: a loss of the
                    # first steps is a gap like any other (recorded, asked for).
                    self._high[key] = high
                waiting = self._waiting.get(key, {}).get(step)
                if waiting is not None or (high is not None and step > high + 1):
                    held = self._wait(db, cid, key, step, payload, waiting)
                    if kind is EnvelopeKind.RECEIPT:
                        self._answer_held_ask(db, cid, (*key, step), payload)
                    return held
        done = self._open_one(db, cid, payload, batch)
        self._release(db, batch)
        return done

    def _wait(
        self,
        db: sqlite3.Connection,
        cid: str,
        key: tuple[str, int, int, int],
        step: int,
        payload: bytes,
        waiting: list[tuple[int, float]] | None,
    ) -> bool:
        """Hold an envelope that overtook a missing step, if it may be genuine.

        What fails to authenticate now is refused at once (counted ``rejected_auth``),
        so junk for a step cannot take the place of the envelope that comes later; a
        byte-identical copy of one waiting is a duplicate; other candidates wait side
        by side (at most MAX_CANDIDATES_PER_STEP), released together in their turn.
        """
        if waiting is not None:
            held = [self.state.held_payload(row) for row, _ in waiting]
            if bytes(payload) in held:
                self._duplicate(cid, payload)
                return True
            if len(waiting) >= MAX_CANDIDATES_PER_STEP:
                self.counters["candidates_dropped"] += 1
                return True
        if self.engine.authentic(cid, payload) is False:
            self.counters["rejected_auth"] += 1
            return True
        now = self._clock()
        until = now + self.options.reorder_window_s
        row, dropped = self.state.hold(db, cid, payload, until)
        self._dropped(dropped)
        self._waiting[key].setdefault(step, []).append((row, until))
        self._lacking(key, now)
        return True

    def _answer_held_ask(
        self, db: sqlite3.Connection, cid: str, step_key: StepKey, payload: bytes
    ) -> None:
        """A gap request is answered when it arrives, even held behind a gap in its
        sender's own chain (a crash skips up to RESERVE_STEPS of it; a broker lost
        some): answered only once that gap fills or is given up, it came after the
        asker had given up too, and the asker showed its messages out of order. The
        receipt is read without opening it; it is opened in its turn, and not
        answered twice."""
        peeked = self.engine.peek_receipt(cid, payload)
        if peeked is None or peeked[1].type is not ReceiptType.MISSING:
            return
        if len(self._answered_early) >= MAX_ANSWERED_EARLY:
            self._answered_early.clear()  # at worst some steps are published twice
        self._answered_early.add(step_key)
        self.counters["gap_requests_answered_held"] += 1
        self._on_missing(db, cid, peeked[0], peeked[1])

    def _hold_again(self, now: float) -> None:
        """On each connect, what is held waits a whole window more and its gaps are
        asked for again. Offline, nothing could be asked, and what revealed a gap may
        have come through the history tail (HTTP) while the broker still held the
        missing steps in our session: it delivers them right after the connect. A
        window that ran out offline showed the later messages first (the soak)."""
        later = now + self.options.reorder_window_s
        for key, steps in self._waiting.items():
            for step, candidates in steps.items():
                steps[step] = [(row, max(until, later)) for row, until in candidates]
            self._asks.settled(key)
            self._lacking(key, now)

    def _lacking(self, key: ChainKey, now: float) -> None:
        """``key`` holds envelopes behind missing steps: ask its sender for them at
        once (a MISSING receipt, on the next tick) and, with a history source, the
        archive too (a tail round)."""
        missing = lacking(self._high_of(key), self._waiting.get(key, {}))
        if (
            missing
            and self._asks.lacking(key, missing[-1][1], now)
            and self.history is not None
            and now >= self._gap_tail_after
        ):
            # At most one round a TAIL_AGAIN_S for gaps: under heavy loss every chain
            # starts episodes, and one round (a request per conversation) serves them all.
            self._gap_tail_after = now + TAIL_AGAIN_S
            self.counters["gaps_asked_history"] += 1
            self._tail_soon()

    def _high_of(self, key: tuple[str, int, int, int]) -> int | None:
        """The highest step shown of a sender chain; before the first, the step before
        the one its grant starts at, so the chain's first envelopes are ordered too."""
        high = self._high.get(key)
        if high is None:
            expected = self.engine.next_step(*key)
            if expected is not None:
                return expected - 1
        return high

    def _release(
        self, db: sqlite3.Connection, batch: _Batch, *, expired: bool = False, grace: float = 0.0
    ) -> None:
        """Open held envelopes whose turn came (or, ``expired``, whose wait is over:
        ``grace`` past their window)."""
        now = self._clock()
        progress = True
        while progress:
            progress = False
            for key, steps in list(self._waiting.items()):
                if not steps:
                    del self._waiting[key]
                    self._asks.settled(key)
                    continue
                first = min(steps)
                until = min(at for _, at in steps[first])
                high = self._high_of(key)
                if high is not None and first > high + 1 and not (expired and until + grace <= now):
                    continue
                for row, _ in steps.pop(first):
                    payload = self.state.held_payload(row)
                    self.state.unhold(db, [row])
                    if payload is not None:
                        self._open_counted(db, key[0], payload, batch)
                progress = True
            if self._advanced and self._reach(db, batch):
                progress = True

    def _open_counted(
        self, db: sqlite3.Connection, cid: str, payload: bytes, batch: _Batch
    ) -> None:
        """Open a held envelope; a refusal is counted (``rejected_<reason>``)."""
        try:
            self._open_one(db, cid, payload, batch)
        except KeyStoreError:
            raise
        except FieldchatError as exc:
            self.counters[f"rejected_{exc.reason}"] += 1

    def _reach(self, db: sqlite3.Connection, batch: _Batch) -> bool:
        """Try the held far-ahead envelopes of the chains that moved, once each comes
        within the engine's reach (an honest sender far ahead is reached a few hundred
        steps per envelope it sends; junk beyond reach is never tried again); whether
        any was tried."""
        tried = False
        while self._advanced:
            key = self._advanced.pop()
            steps = self._unreached.get(key)
            if not steps:
                self._unreached.pop(key, None)
                continue
            limit = self.engine.reach(*key)
            for step in sorted(s for s in steps if limit is not None and s <= limit):
                for row in steps.pop(step):  # every candidate held for that step
                    payload = self.state.held_payload(row)
                    self.state.unhold(db, [row])
                    if payload is not None:
                        self._open_counted(db, key[0], payload, batch)
                        tried = True
        return tried

    def _duplicate(self, cid: str, payload: bytes) -> None:
        """A text seen before came again: its sender may have missed our receipt (a
        broker lost it), so it is receipted again in the next batch."""
        self.counters["duplicate"] += 1
        try:
            kind, _, epoch, index, chain, step, _ = read_header(payload)
        except FieldchatError:
            return
        if kind is EnvelopeKind.TEXT and self.engine.is_member(cid):
            with contextlib.suppress(FieldchatError):
                if self.engine.roster(cid).member_at(index).pid == self.pid:
                    return  # our own echo
            with self._receipts_lock:
                self._receipts[(cid, ReceiptType.DELIVERED)].add((epoch, index, chain, step))

    def _dropped(self, count: int) -> None:
        if count:
            self.counters["held_dropped"] += count
            log.warning("held-envelope limit reached: %d oldest dropped", count)

    def _open_one(self, db: sqlite3.Connection, cid: str, payload: bytes, batch: _Batch) -> bool:
        try:
            opened = self.engine.open(cid, payload)
        except UnsignedJumpTooFar:
            # Held until the chain, or the keys the engine derived towards it, come
            # within reach (PROTOCOL.md §6.4); each try extended them.
            held, dropped = self.state.hold(db, cid, payload)
            self._dropped(dropped)
            _, _, epoch, index, chain_no, step, _ = read_header(payload)
            self._unreached[(cid, epoch, index, chain_no)].setdefault(step, []).append(held)
            self._advanced.add((cid, epoch, index, chain_no))
            return False
        except MissingKey:
            _, dropped = self.state.hold(db, cid, payload)
            self._dropped(dropped)
            return False
        if opened is None:
            self._duplicate(cid, payload)
            return True
        if self._unreached:  # the chain moved: held far-ahead steps may be in reach now
            self._advanced.add((cid, opened.epoch, opened.sender_index, opened.chain))
        message = opened.message
        text = message.text if isinstance(message, TextMessage) else None
        sent_at = message.sent_at if isinstance(message, TextMessage) else None
        row = self.state.add_received(
            db,
            cid,
            opened.epoch,
            opened.sender_index,
            opened.chain,
            opened.step,
            opened.sender,
            int(_kind(message)),
            sent_at,
            text,
        )
        if row is None:
            self._duplicate(cid, payload)
            return True
        late = self._sequence(db, opened, batch)
        if isinstance(message, TextMessage):
            self.counters["received"] += 1
            key = (opened.epoch, opened.sender_index, opened.chain, opened.step)
            with self._receipts_lock:
                self._receipts[(cid, ReceiptType.DELIVERED)].add(key)
            batch.events.append(
                MessageReceived(
                    row,
                    cid,
                    opened.sender,
                    message.text,
                    message.sent_at,
                    opened.epoch,
                    opened.sender_index,
                    opened.chain,
                    opened.step,
                    opened.signed,
                    late,
                )
            )
        elif isinstance(message, Receipt):
            self._on_receipt(db, opened, message, batch)
        elif isinstance(message, Control) and message.op is ControlOp.LEAVE:
            self._on_leave(db, opened)
        return True

    def _sequence(self, db: sqlite3.Connection, opened: Opened, batch: _Batch) -> bool:
        """Per-sender sequence: record gaps, fill them; whether this one was late."""
        key = (opened.cid, opened.epoch, opened.sender_index, opened.chain)
        high = self._high.get(key)
        step = opened.step
        if high is None or step == high + 1:
            self._high[key] = step if high is None else max(high, step)
            return False
        if step > high + 1:
            gap = Gap(
                opened.cid,
                opened.epoch,
                opened.sender_index,
                opened.chain,
                high + 1,
                step - 1,
                opened.sender,
                self._clock(),
            )
            self.state.add_gap(db, gap)
            self._high[key] = step
            self.counters["gaps"] += 1
            # Shown past the missing steps: they did not come within the reorder window
            # (the sender did not answer our asks, the archive lacked them). If they
            # come later they are shown late, out of this sender's order.
            self.counters["reorder_gave_up"] += 1
            log.warning(
                "gave up waiting for steps %d..%d of %s in %s after %g s (reorder_window_s, "
                "%d asks): later messages shown, these will show late if they come",
                gap.first,
                gap.last,
                gap.sender,
                gap.cid,
                self.options.reorder_window_s,
                self._asks.asks(key),
            )
            batch.events.append(
                GapDetected(gap.cid, gap.sender, gap.epoch, gap.chain, gap.first, gap.last)
            )
            return False
        self.state.fill_gap(db, opened.cid, opened.epoch, opened.sender_index, opened.chain, step)
        self.counters["late"] += 1
        return True

    def _on_receipt(
        self, db: sqlite3.Connection, opened: Opened, receipt: Receipt, batch: _Batch
    ) -> None:
        if receipt.type is ReceiptType.MISSING:
            if opened.dedupe_key in self._answered_early:
                self._answered_early.discard(opened.dedupe_key)  # answered while held
            else:
                self._on_missing(db, opened.cid, opened.sender, receipt)
            return
        steps = 0
        mine: dict[tuple[int, int], bool] = {}
        for r in receipt.ranges:
            key = (r.epoch, r.sender)
            if key not in mine:
                mine[key] = self.state.was_sender(opened.cid, r.epoch, r.sender)
            if not mine[key]:
                continue  # a receipt for another member's messages
            self.state.add_receipt(
                db,
                opened.cid,
                opened.sender,
                int(receipt.type),
                r.epoch,
                r.chain,
                r.first,
                r.last,
            )
            steps += r.last - r.first + 1
        if steps:
            batch.events.append(
                ReceiptReceived(opened.cid, opened.sender, receipt.type.name.lower(), steps)
            )

    def _on_missing(self, db: sqlite3.Connection, cid: str, asker: str, receipt: Receipt) -> None:
        """A member lacks steps (a gap request, PROTOCOL.md §4.1): publish again at
        once those of ours we still keep, within the bounds of :class:`Repairs`."""
        self.counters["gap_requests_received"] += 1
        found: list[tuple[tuple[str, int, int, int, int], str, bytes]] = []
        for r in receipt.ranges:  # only our own envelopes are kept: others' steps find none
            left = MAX_REPAIR_PER_REQUEST - len(found)
            if left <= 0:
                break
            for step, topic, payload in self.state.own_envelopes(
                cid, (r.epoch, r.sender, r.chain), r.first, r.last, left
            ):
                found.append(((cid, r.epoch, r.sender, r.chain, step), topic, payload))
        if not found:
            return
        allowed = set(self._repairs.allow([key for key, _, _ in found], self._clock()))
        again = [(key, topic, payload) for key, topic, payload in found if key in allowed]
        for key, topic, payload in again:
            self.state.add_outbox(db, topic, payload, cid=key[0], what="msg")
        self.counters["repaired"] += len(again)
        if again:
            log.info("published %d envelopes again that %s lacked", len(again), asker)

    def _on_leave(self, db: sqlite3.Connection, opened: Opened) -> None:
        roster = self.engine.roster(opened.cid)
        if opened.sender not in roster.pids:
            return
        acting = [m.pid for m in roster.members if m.admin and m.pid != opened.sender]
        if acting and acting[0] == self.pid:
            pubs = self.engine.remove_members(opened.cid, [opened.sender])
            self._queue_publications(db, pubs, opened.cid)

    def _on_roster(self, db: sqlite3.Connection, payload: bytes, batch: _Batch) -> None:
        before = self._positions()
        try:
            pubs = self.engine.handle_roster(payload)
        except RosterPending as exc:
            # Trusted for nothing until its chain is verified (PROTOCOL.md §5.2): the
            # missing rosters come from the gateway, the inviting admin (inbox) or the
            # retained roster; nothing is granted meanwhile.
            self.counters["roster_pending"] += 1
            batch.subscribe.add(self.topics.roster(exc.cid))
            self._fetch_rosters(exc.cid, exc.have)
            return
        self._queue_publications(db, pubs, None)
        for cid, position in self._positions().items():
            if before.get(cid) != position:
                self._membership(cid, batch)
        batch.retry_held = True

    def _positions(self) -> dict[str, tuple[int, bool]]:
        out = {}
        for info in self.conversations():
            out[info.cid] = (info.epoch, info.member)
        return out

    def _membership(self, cid: str, batch: _Batch) -> None:
        try:
            roster = self.engine.roster(cid)
        except UnknownConversation:
            return
        if self.engine.is_member(cid):
            batch.subscribe |= {self.topics.roster(cid), self.topics.msg(cid)}
            batch.subscribe |= {self.topics.bundle(p) for p in roster.pids if p != self.pid}
            batch.events.append(Joined(cid, roster.epoch, roster.pids))
            batch.joined = True
        else:
            batch.unsubscribe.add(self.topics.msg(cid))
            batch.events.append(Removed(cid, roster.epoch))

    def _on_grant(
        self,
        db: sqlite3.Connection,  # noqa: ARG002 - the inbound handlers share one signature
        payload: bytes,
        batch: _Batch,
    ) -> None:
        result = self.engine.handle_grant(payload)
        if result.needs_roster:
            batch.subscribe.add(self.topics.roster(result.cid))
        if result.ends:
            batch.retry_held = True  # envelopes that waited for these chain ends
        if result.installed:
            batch.retry_held = True
            # A member grants its chain only after subscribing to the conversation (its
            # SUBSCRIBE precedes its grants on one connection, so the broker has it):
            # what we sent in this epoch before it was listening is published again —
            # once its receipts for what did reach it have had time to come back
            # (GRANT_RESEND_RECEIPTS intervals), so a burst sent while its grant was on
            # the way is not sent twice.
            granter = Grant.from_bytes(payload).granter
            due = self._clock() + GRANT_RESEND_RECEIPTS * self.options.receipt_interval_s
            self._grant_resends.setdefault((result.cid, granter), due)

    def _resend_to_granters(self, now: float) -> None:
        """Publish again what members who granted us their chain have not receipted."""
        due = [key for key, at in self._grant_resends.items() if at <= now]
        if not due or self._conn is None:
            return
        resent = 0
        with self.state.transaction() as db:
            for cid, granter in due:
                del self._grant_resends[(cid, granter)]
                if not self.engine.is_member(cid):
                    continue
                epoch = self.engine.roster(cid).epoch
                for topic, envelope in self.state.unreceipted(cid, epoch, granter, MAX_RESEND):
                    self.state.add_outbox(db, topic, envelope, cid=cid, what="msg")
                    resent += 1
        self.counters["resent"] += resent
        if resent:
            self._pump()

    def _on_bundle(self, db: sqlite3.Connection, payload: bytes, batch: _Batch) -> None:
        update = self.engine.learn_bundle(payload)
        if update.status is BundleStatus.KEY_CHANGED:
            self.counters["key_changed"] += 1
            log.warning(
                "KEY CHANGED for %s: was %s, now %s — verify with `fieldchat device verify %s`",
                update.pid,
                update.previous_fingerprint,
                update.fingerprint,
                update.pid,
            )
            batch.events.append(
                KeyChanged(update.pid, update.previous_fingerprint, update.fingerprint)
            )
        if update.status in (BundleStatus.NEW, BundleStatus.KEY_CHANGED, BundleStatus.UPDATED):
            self._queue_publications(db, self.engine.pay_owed_grants(), None)

    def _retry_held(self) -> None:
        unreached = {
            row for steps in self._unreached.values() for rows in steps.values() for row in rows
        }
        held = [h for h in self.state.held() if h[0] not in unreached]
        if not held:
            return
        batch = _Batch([], [], set(), set())
        with self.state.transaction() as db:
            done = [i for i, cid, payload, _ in held if self._open_held(db, cid, payload, batch)]
            self.state.unhold(db, done)
            self.engine.flush()
        batch.retry_held = False
        self._after(batch)

    def _open_held(self, db: sqlite3.Connection, cid: str, payload: bytes, batch: _Batch) -> bool:
        # The held copy is re-held by _open on MissingKey; drop this one either way then.
        try:
            opened = self._open(db, cid, payload, batch)
        except KeyStoreError:
            raise
        except FieldchatError as exc:
            self.counters[f"rejected_{exc.reason}"] += 1
            return True
        if not opened:
            self.counters["held_again"] += 1
        return True

    # -- outbound ---------------------------------------------------------------------

    def _queue_publications(
        self, db: sqlite3.Connection, pubs: list[Publication], cid: str | None
    ) -> None:
        for pub in pubs:
            self.state.add_outbox(
                db, pub.topic, pub.payload, retain=pub.retain, cid=cid, what=self._what(pub)
            )

    def _what(self, pub: Publication) -> str:
        """The outbox kind of a publication, from its topic and payload (not its retain
        flag: rosters are proposed, not retained, PROTOCOL.md §5.2). Only ``msg`` and
        ``receipt`` rows share frames (§3.4)."""
        parsed = self._parse(pub.topic)
        if parsed is None or parsed.kind in (TopicKind.ROSTER, TopicKind.PROPOSE):
            return "roster"
        if parsed.kind is TopicKind.INBOX:
            return "roster" if is_roster(pub.payload) else "grant"
        return "msg"

    def _pump(self) -> None:
        conn = self._conn
        if conn is None or not conn.connected:
            return
        window = min(self.options.window, conn.receive_max)
        if len(self._inflight) < window and self.state.outbox_unsynced:
            self.state.sync()  # a grant or roster from a worker batch: durable first
        while len(self._inflight) < window:
            per_frame = self.options.frame_envelopes
            rows = self.state.outbox_from(self._cursor, (window - len(self._inflight)) * per_frame)
            if not rows:
                break
            budget = MAX_FRAME_BYTES
            if conn.max_packet:  # the topic, fixed header, packet id and properties besides
                budget = min(budget, conn.max_packet - len(rows[0].topic) - _PUBLISH_OVERHEAD)
            for group in _frames(rows, window - len(self._inflight), per_frame, budget):
                head = group[0]
                payload = pack_frame([row.payload for row in group])
                mid = conn.publish(
                    head.topic, payload, retain=head.retain, alias=head.what in _ENVELOPE_ROWS
                )
                if self._tracer is not None:
                    for row in group:
                        self._tracer.publish(row.topic, row.payload)
                self._inflight[mid] = tuple(row.seq for row in group)
                self._cursor = group[-1].seq + 1
                self.counters["frames" if len(group) > 1 else "bare"] += 1
        now = self._clock()
        with self._subs_lock:
            due = {t for t, at in self._refused.items() if at <= now and t in self._subs}
            pending = sorted(self._subs_pending | due)
            self._subs_pending.clear()
        for topic in due:
            del self._refused[topic]
        if pending:
            conn.subscribe(pending, no_local=[t for t in pending if t.endswith("/msg")])

    def _tick(self) -> None:
        if self.engine.reservations_low(RENEW_WHEN_LEFT):
            # Made power-safe before the worker (the only publisher) goes on: nothing
            # sealed under it can leave first (PROTOCOL.md §6.3).
            with self.state.transaction(durable=False):
                self.engine.renew_reservations(RENEW_WHEN_LEFT)
            self.state.sync()
        now = self._clock()
        if now >= self._next_receipts:
            self._next_receipts = now + self.options.receipt_interval_s
            if any(self._receipts.values()):
                # No fsync under the state file's lock every interval: pending receipts
                # live in memory until here, so a power cut loses them either way (the
                # sender keeps those messages unconfirmed, as it would then).
                with self.state.transaction(durable=False, sync_outbox=False):
                    self._flush_receipts()
                self._pump()
        if self._grant_resends:
            self._resend_to_granters(now)
        if len(self._asks) and self._conn is not None:
            self._ask_gaps(now)
        if self._resend is not None and now >= self._resend[0] and self._conn is not None:
            _, before = self._resend
            self._resend = None
            self._resend_unconfirmed(before)
        # Offline, a window runs out only gap_timeout_s late: nothing can be asked for,
        # and the broker may hold the missing steps in our session (see _hold_again).
        grace = 0.0 if self._conn is not None else self.options.gap_timeout_s
        if any(
            until + grace <= now
            for steps in self._waiting.values()
            for candidates in steps.values()
            for _, until in candidates
        ):
            batch = _Batch([], [], set(), set())
            with self.state.transaction() as db:
                self._release(db, batch, expired=True, grace=grace)
                self.engine.flush()
            self._after(batch)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + min(10.0, self.options.gap_timeout_s)
            self._housekeeping(now)
        if (
            self._archive_due is not None
            and now >= self._archive_due
            and not self._archive_running
            and self._conn is not None
        ):
            self._start_archive(now)
        if (
            self.history is not None
            and self._next_tail is not None
            and not self._tail_running
            and now >= self._next_tail
            and (self._tail_asked or now - self._last_inbound >= TAIL_QUIET_S)
        ):
            self._start_tail()

    def _flush_receipts(self) -> None:
        """Seal the pending receipts as one message per conversation and type."""
        with self._receipts_lock:
            pending = {k: v for k, v in self._receipts.items() if v}
            self._receipts.clear()
        with self.state.transaction() as db:
            for (cid, rtype), keys in pending.items():
                if not self.engine.is_member(cid):
                    continue
                ranges = _ranges(keys)
                for i in range(0, len(ranges), MAX_RECEIPT_RANGES):
                    receipt = Receipt(type=rtype, ranges=tuple(ranges[i : i + MAX_RECEIPT_RANGES]))
                    self._queue_own(db, cid, self.engine.seal(cid, receipt), "receipt")
                    self.counters["receipts_sent"] += 1

    def _ask_gaps(self, now: float) -> None:
        """Ask the senders of held chains whose ask is due for the steps they lack: one
        MISSING receipt per conversation (PROTOCOL.md §4.1), published at once."""
        wanted: dict[str, list[ReceiptRange]] = defaultdict(list)
        for key in self._asks.due(now):
            missing = lacking(self._high_of(key), self._waiting.get(key, {}))
            if not missing:
                self._asks.settled(key)
                continue
            cid, epoch, index, chain = key
            wanted[cid] += [
                ReceiptRange(epoch=epoch, sender=index, chain=chain, first=first, last=last)
                for first, last in missing
            ]
        if not wanted:
            return
        with self.state.transaction(durable=False, sync_outbox=False) as db:
            for cid, ranges in wanted.items():
                if not self.engine.is_member(cid):
                    continue
                # Lowest steps first; what does not fit is asked for in a later ask.
                receipt = Receipt(
                    type=ReceiptType.MISSING, ranges=tuple(ranges[:MAX_RECEIPT_RANGES])
                )
                self._queue_own(db, cid, self.engine.seal(cid, receipt), "receipt")
                self.counters["gap_requests_sent"] += 1
        self._pump()

    def _queue_own(self, db: sqlite3.Connection, cid: str, envelope: bytes, what: str) -> None:
        """An own receipt or control: into the outbox, and kept a while for gap
        requests (texts are kept in ``sent``)."""
        topic = self.topics.msg(cid)
        seq = self.state.add_outbox(db, topic, envelope, cid=cid, what=what)
        _, _, epoch, index, chain, step, _ = read_header(envelope)
        self.state.add_kept(db, cid, (epoch, index, chain, step), topic, envelope, seq)

    def _resend_unconfirmed(self, before: float) -> None:
        """Publish again own messages some current member has not receipted."""
        rows = self.state.unconfirmed(before, before - self.options.resend_window_s, MAX_RESEND)
        again, done = [], []
        for rid, cid, topic, payload, epoch, chain, step in rows:
            try:
                roster = self.engine.roster(cid)
            except FieldchatError:
                done.append(rid)
                continue
            if roster.epoch != epoch or not self.engine.is_member(cid):
                done.append(rid)
                continue
            want = set(roster.pids) - {self.pid}
            if want <= self.state.receipted_by(cid, epoch, chain, step):
                done.append(rid)
            else:
                again.append((cid, topic, payload))
        with self.state.transaction() as db:
            for cid, topic, payload in again:
                self.state.add_outbox(db, topic, payload, cid=cid, what="msg")
            self.state.forget_payloads(db, done, keep_unarchived=self._archive is not None)
        if again:
            self.counters["resent"] += len(again)
            log.info("published %d unreceipted messages again after reconnecting", len(again))
        self._pump()

    def _housekeeping(self, now: float) -> None:
        stale = [g for g in self.state.gaps() if g.since < now - self.options.gap_timeout_s]
        # With a gateway, own envelopes stay until the archive confirmed them too.
        keep = self._archive is not None
        old = now - self.options.resend_window_s
        with self.state.transaction(durable=False) as db:  # redone next time if lost
            self.state.forget_old_payloads(db, old, keep_unarchived=keep)
            self.state.prune_kept(db, old, keep_unarchived=keep)
            for gap in stale:
                self.state.drop_gap(db, gap)
        for gap in stale:
            self._ask_history(gap)

    def _ask_history(self, gap: Gap) -> None:
        """A gap outlived ``gap_timeout_s``: a tail round fetches what the gateway
        archived after our cursor, the range included."""
        if self.history is None:
            self.counters["gaps_expired"] += 1
            log.info(
                "gap %s %d..%d of %s not filled (no history source)",
                gap.cid,
                gap.first,
                gap.last,
                gap.sender,
            )
            return
        self.counters["gaps_asked"] += 1
        if len(self._gaps_for_tail) < MAX_GAPS_FOR_TAIL:
            self._gaps_for_tail.append(gap)
        self._tail_soon()

    def _backfill(self) -> None:
        """On joining: what the conversation said before our subscription existed (a
        tail round; the new conversation's cursor starts at the archive's start)."""
        if self.history is not None:
            self._tail_soon()

    def _tail_soon(self) -> None:
        """A round at once (or right after the one running), busy link or not: the
        quiet wait is for a reconnect's backlog, which an expired gap is not."""
        self._tail_asked = True
        if not self._tail_running:
            self._next_tail = self._clock()

    def _start_tail(self) -> None:
        """Ask the history source for what it archived after our cursor, per
        conversation (a round on the history thread; see :meth:`_tail_round`).

        Gap recovery needs a later message to reveal the gap: messages lost at the end
        of a run (a broker's offline queue overflowing, Mosquitto's
        ``max_queued_messages``, or a failover) would never be fetched. The cursor is
        the source's (the gateway's sequence number), kept in the state file and
        advanced after each page is committed, so a crash fetches a page again
        (deduplicated) rather than skipping it.
        """
        cursors = [
            (
                cid,
                int(self.state.get_meta(f"{TAIL_CURSOR}{cid}") or 0),
                self.engine.oldest_epoch(cid),
            )
            for cid in self.engine.conversations()
            if self.engine.is_member(cid)
        ]
        marks = {cid: self._tail_marks(cid, epoch) for cid, _, epoch in cursors}
        self._gaps_for_tail.clear()
        self._tail_running = True
        self._tail_asked = False
        self._history_job(lambda: self._tail_round(cursors, marks))
        for cid, have in self.engine.awaiting_rosters().items():  # a failed fetch, again
            self._fetch_rosters(cid, have)

    def _tail_marks(self, cid: str, from_epoch: int) -> list[tuple[int, int, int, int]]:
        """``have`` for ``cid``'s tail (device.reconcile.tail_marks): what the archive
        need not send, from what was shown, the gaps and our own steps. Empty without
        a source that reconciles (a plain source is asked without it)."""
        if self._archive is None:
            return []
        held = {(e, s, c): h for (k, e, s, c), h in self._high.items() if k == cid}
        gaps = [*self.state.gaps(cid), *(g for g in self._gaps_for_tail if g.cid == cid)]
        return tail_marks(held, gaps, self.state.own_high(cid), from_epoch=from_epoch)

    def _tail_round(
        self,
        cursors: list[tuple[str, int, int]],
        marks: dict[str, list[tuple[int, int, int, int]]],
    ) -> None:
        """On the history thread: up to TAIL_PAGES pages per conversation, each handed
        to the worker with the cursor to save after it; then when to look again."""
        history = self.history
        assert history is not None
        archive = history if isinstance(history, Reconciling) else None
        more = False
        try:
            for cid, start, from_epoch in cursors:
                after = start
                for _ in range(TAIL_PAGES):
                    try:
                        if archive is not None and marks.get(cid):
                            envelopes, after_next, more_here = archive.since(
                                cid, after, TAIL_PAGE, from_epoch=from_epoch, have=marks[cid]
                            )
                        else:
                            envelopes, after_next, more_here = history.since(
                                cid, after, TAIL_PAGE, from_epoch=from_epoch
                            )
                    except FieldchatError as exc:
                        self._hand_over(_Fetched(cid, [], error=str(exc)))
                        more_here = False
                        break
                    cursor = (
                        (f"{TAIL_CURSOR}{cid}", str(after_next)) if after_next != after else None
                    )
                    self._hand_over(_Fetched(cid, envelopes, cursor=cursor))
                    after = after_next
                    if not more_here:
                        break
                more = more or more_here
        finally:  # whatever a source raised, rounds go on
            again = TAIL_AGAIN_S if more else self.options.history_tail_s
            self._hand_over(_Fetched("", [], next_tail=again))

    # -- reconciling own envelopes with the archive (device.reconcile) -----------------

    @property
    def _archive(self) -> Reconciling | None:
        """The history source when it reconciles (a gateway): then own envelopes are
        kept until archived. ``history`` may be set after construction."""
        history = self.history
        return history if isinstance(history, Reconciling) else None

    def _start_archive(self, now: float) -> None:
        """A round on the history thread: check what the archive lacks of our own
        envelopes published at least ARCHIVE_SETTLE_S ago, oldest first, and upload it.
        After a connect it waits for the outbox to drain first (for at most
        ``archive_check_s``: a device that never stops sending still checks)."""
        archive = self._archive
        if archive is None:
            self._archive_due = None
            return
        if now < self._archive_drain_until and self.state.outbox_count():
            self._archive_due = now + TAIL_QUIET_S  # what a reconnect queued goes first
            return
        self._archive_drain_until = 0.0
        rows = self.state.unarchived(now - ARCHIVE_SETTLE_S, ARCHIVE_ROUND)
        if not rows:  # nothing to confirm: look again later (a local query, no request)
            self._archive_due = now + self.options.archive_check_s
            return
        self._archive_running = True
        more = len(rows) >= ARCHIVE_ROUND

        def job() -> None:
            outcome = Outcome(errors=["the round failed (see the log)"])
            try:
                outcome = reconcile(archive, rows)
            finally:  # whatever happened, the worker plans the next round
                self._hand_over(_Archived(outcome, more))

        self._history_job(job)

    def _on_archived(self, item: _Archived) -> None:
        """On the worker: record what the archive confirmed; plan the next round."""
        outcome = item.outcome
        gone = {cid for cid in outcome.unauthorized if not self.engine.is_member(cid)}
        with self.state.transaction(durable=False) as db:
            self.state.mark_archived(db, outcome.confirmed)
            self.state.mark_archived(db, [key for key, _ in outcome.refused], REFUSED)
            for cid in gone:  # not a member any more: the gateway will never take them
                self.state.give_up_archive(db, cid)
        self.counters["archive_checked"] += outcome.checked
        self.counters["archive_uploaded"] += outcome.uploaded
        if outcome.uploaded:
            log.info("uploaded %d own envelopes the archive lacked", outcome.uploaded)
        if outcome.refused:
            self.counters["archive_refused"] += len(outcome.refused)
            log.warning(
                "the archive refused %d own envelopes for good (first: %s, %s)",
                len(outcome.refused),
                *outcome.refused[0],
            )
        if outcome.errors:
            self.counters["archive_check_failed"] += 1
            log.info("archive check: %s", "; ".join(outcome.errors[:3]))
        self._archive_running = False
        again = ARCHIVE_AGAIN_S if item.more and not outcome.errors else None
        self._archive_due = self._clock() + (again or self.options.archive_check_s)

    def _fetch_rosters(self, cid: str, have: int) -> None:
        """Ask the history source for the rosters a chain waits for (on the history
        thread, at most every ROSTER_FETCH_AGAIN_S per conversation)."""
        history = self.history
        now = self._clock()
        if history is None or self._roster_fetches.get(cid, 0.0) > now:
            return
        self._roster_fetches[cid] = now + ROSTER_FETCH_AGAIN_S
        self.counters["roster_fetches"] += 1

        def job() -> None:
            try:
                rosters = history.rosters(cid, from_epoch=have + 1)
            except FieldchatError as exc:
                self._hand_over(_Fetched(cid, [], error=str(exc), rosters=[]))
                return
            self._hand_over(_Fetched(cid, [], rosters=rosters))

        self._history_job(job)

    def _on_fetched_rosters(self, cid: str, rosters: list[bytes]) -> None:
        if not rosters:
            return
        self.counters["rosters_fetched"] += len(rosters)
        batch = _Batch([], [], set(), set())
        with self.state.transaction() as db:
            for payload in rosters:
                try:
                    self._on_roster(db, payload, batch)
                except KeyStoreError:
                    raise
                except FieldchatError as exc:
                    self.counters[f"rejected_{exc.reason}"] += 1
            self.engine.flush()
        if self.engine.awaiting_rosters().get(cid) is not None:
            log.info("rosters of %s fetched; its chain still waits for others", cid)
        self._after(batch)

    def _on_fetched(self, item: _Fetched) -> None:
        """On the worker: open what the history thread fetched, then save its cursor."""
        if item.rosters is not None:
            self._on_fetched_rosters(item.cid, item.rosters)
        if item.error is not None:
            what = "rosters" if item.rosters is not None else "history tail"
            self.counters[
                "roster_fetch_failed" if item.rosters is not None else "history_tail_failed"
            ] += 1
            log.info("%s of %s failed: %s", what, item.cid, item.error)
        if item.envelopes:
            self.counters["history_tail_fetched"] += len(item.envelopes)
            envelopes = item.envelopes
            if self.engine.is_member(item.cid):
                epoch = self.engine.roster(item.cid).epoch
                envelopes = [e for e in envelopes if self._may_open(item.cid, epoch, e)]
            self._open_fetched(item.cid, envelopes)
        if item.cursor is not None:
            self.state.set_meta({item.cursor[0]: item.cursor[1]})
        if item.next_tail is not None:
            self.counters["history_tail_rounds"] += 1
            self._tail_running = False
            self._next_tail = self._clock() + (0.0 if self._tail_asked else item.next_tail)

    def _history_job(self, job: Callable[[], None]) -> None:
        if self._history_thread is None:
            self._history_thread = threading.Thread(
                target=self._history_loop, name="fieldchat-history", daemon=True
            )
            self._history_thread.start()
        self._history_jobs.put(job)

    def _history_loop(self) -> None:
        while (job := self._history_jobs.get()) is not None:
            try:
                job()
            except Exception:  # the thread must outlive a bad source
                log.exception("history job failed")

    def _hand_over(self, item: _Fetched | _Archived) -> None:
        """Queue for the worker, waiting while its queue is full (never past close)."""
        while not self._closed:
            try:
                self._queue.put(item, timeout=0.5)
            except queue.Full:
                continue
            return

    def _may_open(self, cid: str, epoch: int, envelope: bytes) -> bool:
        """Whether an archived envelope can ever be opened (not of an epoch before ours
        from a chain we hold no key for)."""
        try:
            _, _, env_epoch, index, chain, _, _ = read_header(envelope)
        except FieldchatError:
            return True  # the engine rejects and counts it
        return env_epoch >= epoch or self.engine.next_step(cid, env_epoch, index, chain) is not None

    def _open_fetched(self, cid: str, envelopes: list[bytes]) -> None:
        if not envelopes:
            return
        batch = _Batch([], [], set(), set())
        with self.state.transaction() as db:
            for envelope in envelopes:
                try:
                    self._open(db, cid, envelope, batch)
                except KeyStoreError:
                    raise
                except FieldchatError as exc:
                    self.counters[f"rejected_{exc.reason}"] += 1
            self.engine.flush()
        self._after(batch)

    # -- subscriptions ----------------------------------------------------------------

    def _init_subscriptions(self) -> None:
        subs = {self.topics.inbox(self.pid)}
        for info in self.conversations():
            if info.epoch < 0:
                subs.add(self.topics.roster(info.cid))
            elif info.member:
                subs |= {self.topics.roster(info.cid), self.topics.msg(info.cid)}
                subs |= {self.topics.bundle(p) for p in info.members if p != self.pid}
        self._subs = subs

    def _follow(self, cid: str) -> None:
        """Subscribe to a conversation we just changed, after its roster is published."""
        roster = self.engine.roster(cid)
        topics = {self.topics.roster(cid), self.topics.msg(cid)}
        topics |= {self.topics.bundle(p) for p in roster.pids if p != self.pid}
        with self._subs_lock:
            new = topics - self._subs
            self._subs |= new
            self._subs_pending |= new
        self._wake()

    def _subscribe(self, topics: Sequence[str]) -> None:
        with self._subs_lock:
            new = [t for t in topics if t not in self._subs]
            self._subs.update(new)
        conn = self._conn
        if new and conn is not None:
            conn.subscribe(new, no_local=[t for t in new if t.endswith("/msg")])

    # -- helpers ----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):  # a wake-up is already pending
            self._queue.put_nowait(_Wake())

    def _emit(self, event: Event) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # an application callback must not stop delivery
            log.exception("on_event callback failed")

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise KeyStoreError(f"the device stopped after a state file failure: {self._fatal}")


def _frames(
    rows: Sequence[OutboxRow], limit: int, per_frame: int, budget: int = MAX_FRAME_BYTES
) -> list[list[OutboxRow]]:
    """At most ``limit`` PUBLISH packets for ``rows``, in order: up to ``per_frame``
    consecutive envelopes of one conversation, ``budget`` bytes in all, share a frame
    (PROTOCOL.md §3.4), anything else travels alone.

    The budget is the broker's Maximum Packet Size where it announces one: an
    envelope that fits alone must not be refused for travelling with others.

    Only what is queued already is grouped: nothing waits for company, so a lone message
    leaves at once, as before, and a backlog (a burst, a link that came back) leaves
    in a sixty-fourth of the packets, PUBACKs and topic names.
    """
    groups: list[list[OutboxRow]] = []
    framed = 0  # bytes of the last group as a frame
    for row in rows:
        if groups and row.what in _ENVELOPE_ROWS and not row.retain:
            group = groups[-1]
            head = group[0]
            if (
                head.what in _ENVELOPE_ROWS
                and not head.retain
                and head.topic == row.topic
                and len(group) < per_frame
                and framed + part_bytes(len(row.payload)) <= budget
            ):
                group.append(row)
                framed += part_bytes(len(row.payload))
                continue
        if len(groups) == limit:
            break
        groups.append([row])
        framed = 1 + part_bytes(len(row.payload))
    return groups


def _kind(message: TextMessage | Receipt | Control) -> int:
    return 1 if isinstance(message, TextMessage) else 2 if isinstance(message, Receipt) else 3


def _ranges(keys: set[tuple[int, int, int, int]]) -> list[ReceiptRange]:
    """Collapse ``(epoch, sender, chain, step)`` keys into inclusive step ranges.

    Merged as plain lists, one validated model per range at the end: a model per key
    (rebuilt at every merged step) was ≈ 7 % of a receiving device's CPU.
    """
    spans: list[list[int]] = []  # [epoch, sender, chain, first, last]
    for epoch, sender, chain, step in sorted(keys):
        if spans:
            last = spans[-1]
            if last[0] == epoch and last[1] == sender and last[2] == chain and last[4] + 1 == step:
                last[4] = step
                continue
        spans.append([epoch, sender, chain, step, step])
    return [
        ReceiptRange(epoch=e, sender=s, chain=c, first=first, last=last)
        for e, s, c, first, last in spans
    ]


def _digits(fingerprint: str) -> str:
    return "".join(ch for ch in fingerprint if ch.isdigit())
