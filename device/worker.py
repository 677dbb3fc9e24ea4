"""The device's worker thread: the one thread that moves bytes between the link, the
state file and the parts that decide (docs/device.md, "Delivery model").

    paho thread ──message/ack──▶ queue ──▶ worker: open + store + ack, in batches
    history thread ──fetched──▶ queue ──▶ worker: open like live messages
    worker turn ──▶ Outbound (publish, receipts, asks, resends) ──▶ paho

Received batches commit without an fsync, are shown, then made power-safe (an fsync on
a thread of its own, one at a time, covering every batch committed before it) and
only then PUBACKed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fieldchat.device.context import Batch, Part, Shared
from fieldchat.device.events import Connected, Disconnected, Event
from fieldchat.device.inbound import Inbound
from fieldchat.device.link import Link, LinkConnection, PubackRefusal
from fieldchat.device.outbound import Outbound
from fieldchat.device.presence import STATUS_OFFLINE, STATUS_ONLINE, Presence
from fieldchat.device.receipts import ReceiptBook
from fieldchat.device.refusals import refuse
from fieldchat.device.resend import Resends
from fieldchat.device.roster_wait import RosterWait
from fieldchat.device.rosters import RosterHandler
from fieldchat.device.rounds import Archived, HistoryRounds
from fieldchat.device.sequencer import Sequencer
from fieldchat.device.subscriptions import Subscriptions, no_local
from fieldchat.device.tail import Fetched
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.errors import (
    ConnectFailed,
    FieldchatError,
    InvalidStatus,
    KeyStoreError,
    NotAuthorized,
    TransportError,
)
from fieldchat.schemas.frame import split
from fieldchat.schemas.topics import TopicKind

__all__ = ["BATCH", "MAX_QUEUE", "STATUS_OFFLINE", "STATUS_ONLINE", "Worker"]

PREKEY_CHECK_S = 3_600.0  # how often the worker checks whether a prekey is due

log = logging.getLogger("fieldchat.device")

MAX_QUEUE = 10_000  # inbound packets waiting for the worker; paho's thread blocks past it
BATCH = 256  # inbound packets per transaction (one fsync)
_TICK_S = 0.05


@dataclass(frozen=True, slots=True)
class Up:
    conn: LinkConnection
    session_present: bool


@dataclass(frozen=True, slots=True)
class Down:
    conn: LinkConnection
    reason: str


@dataclass(frozen=True, slots=True)
class Arrived:
    """A PUBLISH the broker delivered (``mid`` to PUBACK once durable)."""

    conn: LinkConnection
    mid: int
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True, slots=True)
class Acked:
    """The broker's answer to one of our PUBLISHes (``refusal``: it refused it)."""

    conn: LinkConnection
    mid: int
    refusal: PubackRefusal | None  # a negative PUBACK (MQTT 5)


@dataclass(frozen=True, slots=True)
class SubscribeRefused:
    conn: LinkConnection
    topics: list[str]


@dataclass(frozen=True, slots=True)
class Wake:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Item = Up | Down | Arrived | Acked | SubscribeRefused | Wake | Stop | Fetched | Archived


class Worker(Part):
    """Owns the worker thread, the connection it publishes on and the parts it drives.

    Args:
        shared: the device's state, engine and options.
        receipts: receipts owed (the application adds read receipts).
        subscriptions: the topics wanted (the application follows conversations).
        emit: delivers an event to the application.
    """

    def __init__(
        self,
        shared: Shared,
        receipts: ReceiptBook,
        subscriptions: Subscriptions,
        emit: Callable[[Event], None],
    ) -> None:
        super().__init__(shared)
        self.subscriptions = subscriptions
        self._emit = emit
        # Each sender's order, with what a previous run held for it (device.sequencer).
        sequencer = Sequencer(
            shared.options.reorder_window_s,
            lambda key: self.engine.next_step(*key),
            self.state.high_steps(),
        )
        for held in self.state.held(reordering=True):
            with contextlib.suppress(FieldchatError):
                header = read_header(held.payload)
                key = (held.cid, *header.chain_id)
                sequencer.restore(key, header.step, held.id, held.until or 0.0)
        resends = Resends()
        # The rounds are made last (they open what they fetch through inbound): these
        # two reach them through the worker when called.
        rosters = RosterHandler(shared, resends, self._fetch_rosters)
        self.inbound = Inbound(shared, sequencer, receipts, rosters, self._episode)
        self.outbound = Outbound(shared, sequencer, receipts, resends, subscriptions)
        self.rounds = HistoryRounds(shared, self.inbound, self.hand_over, self.apply)
        self.presence = Presence(shared)
        self._queue: queue.Queue[Item] = queue.Queue(MAX_QUEUE)
        self.changed = threading.Condition()  # notified after every turn
        self.fatal: KeyStoreError | None = None
        self.link: Link | None = None
        self.closed = False
        self._thread: threading.Thread | None = None
        self._retried_at_start = False
        self._next_prekey_check = 0.0
        self._next_housekeeping = 0.0
        self.roster_wait = RosterWait()
        self._next_roster_wait = 0.0
        # Checks half of each received batch's signatures beside the worker (the
        # thread starts on first use; see Engine.preverify).
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="fieldchat-verify")
        # PUBACKs of committed batches waiting for the fsync that makes them power-safe:
        # (state generation to reach, acks). The fsync runs on its own thread so the
        # worker opens and shows the next messages meanwhile (see _send_acks).
        self._unacked: deque[tuple[int, list[tuple[LinkConnection, int]]]] = deque()
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fieldchat-sync")
        self._syncing: Future[None] | None = None

    def _fetch_rosters(self, cid: str, have: int) -> None:
        self.rounds.fetch_rosters(cid, have)

    def _episode(self, now: float) -> None:
        self.rounds.episode(now)

    # -- the thread -------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the thread; what a previous run held is asked for at once."""
        self.inbound.restart()
        self._thread = threading.Thread(target=self._work, name="fieldchat-device", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its turn, then the helpers (and the history thread)."""
        self.closed = True
        if self._thread is not None:
            self._queue.put(Stop())
            self._thread.join(10)
            self._thread = None
        self.rounds.close()
        self._verifier.shutdown()
        self._syncer.shutdown()

    def put(self, item: Item) -> None:
        """Queue for the worker (the link's thread blocks while the queue is full)."""
        self._queue.put(item)

    def wake(self) -> None:
        """A turn soon (the outbox has rows, a subscription is pending)."""
        with contextlib.suppress(queue.Full):  # a wake-up is already pending
            self._queue.put_nowait(Wake())

    def hand_over(self, item: Fetched | Archived) -> None:
        """Queue for the worker, waiting while its queue is full (never past close)."""
        while not self.closed:
            try:
                self._queue.put(item, timeout=0.5)
            except queue.Full:
                continue
            return

    # -- the link handler (paho thread: enqueue only) ----------------------------------

    def wait_connected(
        self, link: Link | None, addresses: Sequence[tuple[str, int]], timeout: float
    ) -> None:
        """Block until the worker has a connection whose subscriptions the broker
        confirmed (see ``Device.wait_connected``)."""
        end = time.monotonic() + timeout
        with self.changed:
            while (conn := self.outbound.conn) is None or not conn.ready or conn.pending_subscribes:
                error = link.last_error if link else None
                if isinstance(error, NotAuthorized):
                    raise error
                left = end - time.monotonic()
                if left <= 0:
                    where = ", ".join(f"{h}:{p}" for h, p in addresses)
                    if conn is not None:
                        raise ConnectFailed(
                            f"connected to {where}, but the broker did not confirm our "
                            f"subscriptions in {timeout:g} s"
                        )
                    if error is not None:
                        raise type(error)(str(error))
                    raise ConnectFailed(f"no connection to {where} in {timeout:g} s")
                self.changed.wait(min(left, 0.1))

    def link_connected(self, conn: LinkConnection, session_present: bool) -> None:
        self.put(Up(conn, session_present))

    def link_message(
        self, conn: LinkConnection, mid: int, topic: str, payload: bytes, qos: int
    ) -> None:
        self.put(Arrived(conn, mid, topic, payload, qos))

    def link_published(self, conn: LinkConnection, mid: int, refusal: PubackRefusal | None) -> None:
        self.put(Acked(conn, mid, refusal))

    def link_disconnected(self, conn: LinkConnection, reason: str) -> None:
        self.put(Down(conn, reason))

    def link_refused(self, conn: LinkConnection, topics: list[str]) -> None:
        self.put(SubscribeRefused(conn, topics))

    def link_subscribed(self, conn: LinkConnection) -> None:  # noqa: ARG002 - read via conn
        with self.changed:  # wait_connected waits for the SUBACKs
            self.changed.notify_all()

    def link_failed(self, error: TransportError) -> None:  # noqa: ARG002 - read via the link
        with self.changed:
            self.changed.notify_all()

    def subscribe(self, topics: Sequence[str]) -> None:
        """Want ``topics``; subscribe those new at once when connected."""
        new = self.subscriptions.add(topics)
        conn = self.outbound.conn
        if new and conn is not None:
            conn.subscribe(new, no_local=no_local(new))

    def _work(self) -> None:
        """The worker thread: batches of what arrived, then what is due, until stopped."""
        while True:
            items: list[Item] = []
            with contextlib.suppress(queue.Empty):
                items.append(self._queue.get(timeout=_TICK_S))
            while items and len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(isinstance(item, Stop) for item in items)
            try:
                self._process(items)
                self._send_acks()
                if not stop:
                    self.outbound.pump()
                    self._tick()
            except KeyStoreError as exc:
                log.critical("state file failure, the device stops: %s", exc)
                self.fatal = exc
                if self.link is not None:
                    threading.Thread(target=self.link.stop, daemon=True).start()
                stop = True
            except Exception:  # the worker must not die with the device still open
                log.exception("device worker error")
            with self.changed:
                self.changed.notify_all()
            if stop:
                return

    def _process(self, items: list[Item]) -> None:
        """One turn's items, messages and acknowledgements committed in batches."""
        batch = Batch()
        pending: list[Arrived | Acked] = []
        for item in items:
            if isinstance(item, Arrived) and self._status(item, batch):
                continue
            if isinstance(item, (Arrived, Acked)):
                pending.append(item)
                if isinstance(item, Arrived):
                    self.rounds.tail.inbound(self._clock())
            elif isinstance(item, SubscribeRefused):
                # The broker may learn our membership (from the roster) only after our
                # SUBSCRIBE: try again soon, while we still want the topic.
                self.subscriptions.refused(item.topics, self._clock())
                self.counters["subscribe_refused"] += len(item.topics)
            elif isinstance(item, (Up, Down)):
                self._commit(pending, batch)
                pending = []
                self._control(item, batch)
            elif isinstance(item, Fetched):
                self._commit(pending, batch)
                pending = []
                self.rounds.on_fetched(item)
            elif isinstance(item, Archived):
                self.rounds.on_archived(item)
        self._commit(pending, batch)
        self.apply(batch)

    def _status(self, item: Arrived, batch: Batch) -> bool:
        """A member's presence status (device/presence.py); False: another topic."""
        parsed = self._parse(item.topic)
        if parsed is None or parsed.kind is not TopicKind.STATUS or parsed.pid is None:
            return False
        try:
            event = self.presence.on_status(parsed.pid, item.payload, self._clock())
        except InvalidStatus as exc:
            self._rejected(exc)
            log.debug("rejected the status on %s: %s", item.topic, exc)
            event = None
        if event is not None:
            batch.events.append(event)
        if item.qos:
            batch.acks.append((item.conn, item.mid))
        return True

    def _follow_presence(self) -> None:
        """Follow the status topics of the current members (device/presence.py)."""
        follow, drop = self.presence.update()
        if follow:
            self.subscribe(follow)
        if drop:
            self.subscriptions.remove(drop)
            if self.outbound.conn is not None:
                self.outbound.conn.unsubscribe(drop)

    def _commit(self, items: list[Arrived | Acked], batch: Batch) -> None:
        """Open and store what arrived, drop what the broker acknowledged: one
        transaction, checked two threads at a time first (Engine.preverify)."""
        if not items:
            return
        envelopes = []
        frames: dict[int, list[bytes]] = {}  # an Arrived's envelopes (by id), split once
        for item in items:
            if isinstance(item, Arrived):
                parsed = self._parse(item.topic)
                if parsed is not None and parsed.kind is TopicKind.MSG and parsed.cid:
                    with contextlib.suppress(FieldchatError):  # counted by on_message
                        frames[id(item)] = split(item.payload)
                        envelopes += [(parsed.cid, e) for e in frames[id(item)]]
        if len(envelopes) > 1:
            self.engine.preverify(envelopes, self._verifier)
        acked: list[int] = []
        # No fsync here: the batch is shown once committed (a process crash keeps it)
        # and made power-safe by one sync() before its PUBACKs leave (_after).
        with self.state.transaction(durable=False) as tx:
            for item in items:
                if isinstance(item, Arrived):
                    envelopes_of = frames.get(id(item))
                    self.inbound.on_message(tx, item.topic, item.payload, batch, envelopes_of)
                    if item.qos:
                        batch.acks.append((item.conn, item.mid))
                    continue
                if item.conn is not self.outbound.conn:
                    continue
                seqs = self.outbound.inflight.acknowledged(item.mid)
                if seqs is None:
                    continue
                if item.refusal is not None:  # never published again (device/refusals.py)
                    self.counters["refused_by_broker"] += len(seqs)
                    batch.events.append(refuse(tx, seqs, item.refusal))
                    continue
                acked += seqs
            if acked:
                tx.acknowledged(acked, self._clock())
            self.engine.flush()

    def apply(self, batch: Batch | None) -> None:
        """Apply a committed transaction's side effects (``None``: there were none)."""
        if batch is None:
            return
        # Shown once committed: a restarted process finds them stored and drops the
        # broker's redelivery, so each is shown once.
        for event in batch.events:
            self._emit(event)
        # Acknowledged only once durable: after a power cut the broker still has them.
        if batch.acks:
            self._unacked.append((self.state.generation, batch.acks))
            self._send_acks()
        if batch.subscribe:
            self.subscribe(sorted(batch.subscribe))
        if batch.unsubscribe:
            self.subscriptions.remove(batch.unsubscribe)
            current = self.outbound.conn
            if current is not None:
                current.unsubscribe(sorted(batch.unsubscribe))
        if batch.retry_held:
            self.apply(self.inbound.retry_held())
        if batch.joined:
            self.rounds.backfill()
        if batch.subscribe or batch.unsubscribe:  # a roster changed (its members too)
            self._follow_presence()

    def _send_acks(self) -> None:
        """PUBACK, in order, what an fsync has made power-safe; start one for the rest.

        One fsync at a time covers every batch committed before it started (group
        commit), and the worker does not wait for it: under a busy disk a slow fsync
        delays PUBACKs, not the next messages on screen.

        Raises:
            KeyStoreError: a background fsync failed (the device stops).
        """
        if self.fatal is not None:
            raise self.fatal
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
            self.fatal = exc  # raised on the worker by _send_acks
        self.wake()

    def _control(self, item: Up | Down, batch: Batch) -> None:
        """A connection came up (publish bundle and status, outbox, subscribe) or went."""
        conn = item.conn
        if isinstance(item, Up):
            self.outbound.conn = conn
            self.outbound.inflight.reset()
            self.engine.maintain_prekeys()  # rotate a due prekey before publishing it
            conn.publish(
                self.topics.bundle(self.pid), self.engine.identity.bundle.to_bytes(), retain=True
            )
            conn.publish_status(self.topics.status(self.pid), STATUS_ONLINE)
            # Outbox first (a new conversation's roster), then SUBSCRIBE: a broker that
            # learns membership from rosters then already knows us (same connection,
            # packets processed in order).
            self.subscriptions.forget_refusals()
            follow, drop = self.presence.update()  # subscribed below with the rest
            self.subscriptions.add(follow)
            self.subscriptions.remove(drop)
            self.outbound.pump()
            topics = self.subscriptions.connected()
            conn.subscribe(topics, no_local=no_local(topics))
            conn.ready = True
            self.roster_wait.reconnected()
            now = self._clock()
            self.inbound.hold_again(now)
            if self.link is not None and self.link.connects > 1:
                self.outbound.resends.reconnected(now, self.options.resend_after_s)
            self.rounds.connected(now)
            if not self._retried_at_start:
                # What a previous run held (a key, a chain end, a far step) is tried once
                # with this run's state; and chains that wait for rosters are fetched.
                self._retried_at_start = True
                batch.retry_held = True
                for cid, have in self.engine.awaiting_rosters().items():
                    self.rounds.fetch_rosters(cid, have)
            self.counters["connects"] += 1
            batch.events.append(Connected(conn.protocol, item.session_present))
            log.info(
                "connected (MQTT %s, session %s)",
                conn.protocol,
                "resumed" if item.session_present else "new",
            )
        elif conn is self.outbound.conn:
            self.outbound.conn = None
            self.outbound.inflight.reset()
            batch.events.append(Disconnected(item.reason))
            log.info("disconnected: %s", item.reason)

    def _tick(self) -> None:
        """What is due on this turn: owed publications, held envelopes whose wait is
        over, housekeeping, history rounds."""
        self.outbound.renew_reservations()
        now = self._clock()
        self.outbound.owed(now)
        # Offline, a window runs out only gap_timeout_s late: nothing can be asked for,
        # and the broker may hold the missing steps in our session (Inbound.hold_again).
        grace = 0.0 if self.outbound.conn is not None else self.options.gap_timeout_s
        if self.inbound.sequencer.expired(now, grace):
            batch = Batch()
            with self.state.transaction() as tx:
                self.inbound.release(tx, batch, expired=True, grace=grace)
                self.engine.flush()
            self.apply(batch)
        if now >= self._next_prekey_check:
            # Prekeys rotate by time and by use, and old ones are deleted after their
            # grace period (PROTOCOL.md §2.5): checked hourly, the new bundle retained.
            self._next_prekey_check = now + PREKEY_CHECK_S
            pubs = self.engine.maintain_prekeys()
            if pubs:
                with self.state.transaction() as tx:
                    self.outbound.queue_publications(tx, pubs, None)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + min(10.0, self.options.gap_timeout_s)
            for gap in self.outbound.housekeeping(now):
                self.rounds.ask_history(gap)
        self.rounds.tick(now, connected=self.outbound.conn is not None)
        if self.outbound.conn is not None and now >= self._next_roster_wait:
            self._next_roster_wait = now + 1.0
            self._ask_rosters_again(self.outbound.conn, now)
            if self.engine.epoch_requests_due():  # their turn may have come (§6.7)
                with self.state.transaction() as tx:
                    self.inbound.rosters.on_epoch_request(tx)
                    self.engine.flush()
        if self.presence.due(now):  # members the application added or removed
            self._follow_presence()

    def _ask_rosters_again(self, conn: LinkConnection, now: float) -> None:
        """SUBSCRIBE again to the roster topics of conversations still waiting for a
        roster, which makes the broker send the retained roster again (roster_wait.py
        says why and how often); and ask the gateway, if one is configured."""
        awaiting = self.engine.awaiting_rosters()
        for cid in self.roster_wait.due(now, awaiting):
            topic = self.topics.roster(cid)
            self.counters["roster_asked_again"] += 1
            log.info("still waiting for a roster of %s: asking the broker again", cid)
            self.subscriptions.add([topic])
            conn.subscribe([topic])
            self.rounds.fetch_rosters(cid, awaiting[cid])
