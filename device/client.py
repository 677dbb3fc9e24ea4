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

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fieldchat.device.changes import Changes
from fieldchat.device.config import BrokerOptions, LinkOptions
from fieldchat.device.context import Shared
from fieldchat.device.engine import Engine
from fieldchat.device.events import Event
from fieldchat.device.link import LastWill, Link, LinkConnection
from fieldchat.device.receipts import ReceiptBook
from fieldchat.device.rows import Gap, OutboxRow, ReceivedRow, SentRow
from fieldchat.device.state import DeviceState
from fieldchat.device.subscriptions import Subscriptions, wanted_topics
from fieldchat.device.tail import HistorySource
from fieldchat.device.texts import (
    ConversationInfo,
    SentMessage,
    TextQueue,
    conversation_infos,
    fingerprint_of,
    same_fingerprint,
    undelivered_count,
)
from fieldchat.device.worker import (
    STATUS_OFFLINE,
    Worker,
)
from fieldchat.schemas import Policy, ReceiptType, Topics
from fieldchat.schemas.errors import (
    FieldchatError,
    KeyStoreError,
    TransportError,
)
from fieldchat.schemas.topics import DEFAULT_PREFIX

__all__ = ["ConversationInfo", "Device", "HistorySource", "SentMessage"]

# How long a send waits for the secret of an epoch just entered (§6.6).
KEY_WAIT_S = 10.0

log = logging.getLogger("fieldchat.device")


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

    def __init__(
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
        self.broker = broker or BrokerOptions()
        self.topics = Topics(prefix)
        self.on_event = on_event
        self._clock = clock
        with self.state.transaction():
            self.engine = Engine.open_store(
                self.state, topics=self.topics, post_quantum=post_quantum
            )
        self._shared = Shared(
            self.state, self.engine, self.topics, link or LinkOptions(), history, clock
        )
        self.counters = self._shared.counters
        self._texts = TextQueue(self.engine, self.state, self.topics, clock, power_safe=power_safe)
        self._receipts = ReceiptBook()  # owed, sealed every receipt_interval_s
        self._subs = Subscriptions(
            wanted_topics(
                self.topics,
                self.pid,
                [(c.cid, c.epoch, c.member, c.members) for c in self.conversations()],
            )
        )
        self._worker = Worker(self._shared, self._receipts, self._subs, self._emit)
        self._changes = Changes(self._shared, self._worker)  # to conversations and keys
        self._link: Link | None = None
        self._closed = False

    @property
    def power_safe(self) -> bool:
        """Whether :meth:`send` returns only once a power cut cannot lose the message."""
        return self._texts.power_safe

    @power_safe.setter
    def power_safe(self, value: bool) -> None:
        self._texts.power_safe = value

    @property
    def options(self) -> LinkOptions:
        """Timing, batching and low-bandwidth tuning (may be replaced before start)."""
        return self._shared.options

    @options.setter
    def options(self, options: LinkOptions) -> None:
        self._shared.options = options

    @property
    def history(self) -> HistorySource | None:
        """Where missing envelopes are asked for (may be set before start)."""
        return self._shared.history

    @history.setter
    def history(self, history: HistorySource | None) -> None:
        self._shared.history = history

    # -- identity ---------------------------------------------------------------------

    @property
    def pid(self) -> str:
        return self.engine.pid

    def fingerprint(self, pid: str | None = None) -> str:
        """Our fingerprint, or a known participant's.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        return fingerprint_of(self.engine, pid)

    def start(self) -> Device:
        """Start the worker and the link (connects in the background).

        Raises:
            ConfigError: another process is using the same state file.
        """
        if self._worker.started:
            return self
        self.state.lock()
        self.state.checkpoint_in_background()
        self._worker.start()
        protocol = self.state.get_meta("protocol") if self.broker.protocol == "auto" else None
        self._link = Link(
            self.pid,
            self.broker,
            self.options,
            self._worker.mailbox,
            will=LastWill(self.topics.status(self.pid), STATUS_OFFLINE),
            protocol=protocol,
            on_protocol=lambda p: self.state.set_meta({"protocol": p}),
        )
        self._link.farewell = lambda conn: conn.publish_status(
            self.topics.status(self.pid), STATUS_OFFLINE
        )
        self._worker.link = self._link
        self._link.start()
        return self

    def close(self) -> None:
        """Stop the link (clean disconnect), the worker, and close the state file."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            self._link.stop()
        self._worker.stop()
        try:
            with self.state.transaction():
                self._worker.outbound.flush_receipts()
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
    def _conn(self) -> LinkConnection | None:
        """The connection the worker publishes on (``None`` while down)."""
        return self._worker.outbound.conn

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def last_error(self) -> TransportError | None:
        """Why the last connection attempt failed (``None`` once one succeeded): what
        ``listen`` says while it waits for the broker."""
        return self._link.last_error if self._link is not None else None

    @property
    def protocol(self) -> str | None:
        conn = self._conn
        return conn.protocol if conn else None

    def presence(self) -> dict[str, bool]:
        """Whether each member followed for presence was online at its last status
        (docs/device.md, "Presence"); a member whose status has not arrived is absent."""
        return self._worker.presence.online()

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until connected and the broker confirmed our subscriptions (SUBACK):
        from then on what is published to us, an invitation to our inbox say, reaches
        us. A broker may create a subscription well after a later PUBLISH of ours is
        acknowledged (NATS builds a JetStream consumer for each).

        Raises:
            NotAuthorized: the broker refused our credential.
            ConnectFailed: not connected, or not subscribed, within ``timeout`` (the
                last reason).
        """
        self._worker.wait_connected(self._link, self.broker.addresses, timeout)
        self._raise_fatal()

    def wait_drained(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged the whole outbox; whether it did."""
        return self.wait_for(lambda: not self.state.outbox_count(), timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (checked whenever the worker made progress)."""
        return self._worker.wait_for(predicate, timeout)

    # -- sending ----------------------------------------------------------------------

    def send(self, cid: str, text: str, *, idempotency_key: str | None = None) -> SentMessage:
        """Seal ``text`` for ``cid`` and make it durable; it leaves as soon as it can.

        With ``idempotency_key``, a send under a key used before (within the bounds of
        :mod:`fieldchat.device.idempotency`, across restarts) queues nothing and returns
        the first one's message, marked ``replayed``.

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
            LimitExceeded: the text is too long.
            IdempotencyConflict: the key was used for another conversation or text.
            ConfigError: an empty or too long key.
            KeyStoreError: the state file could not be written (nothing was queued).
        """
        return self._queue(cid, [text], idempotency_key)[0]

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
        return self._queue(cid, texts, None)

    def _wait_keyed(self, cid: str) -> None:
        """A new epoch's secret is on its way from the admin (§6.6), one inbox hop:
        wait for it up to KEY_WAIT_S rather than seal in the old epoch, which a member
        just removed could read."""
        if self.engine.is_member(cid) and not self.engine.keyed(cid):
            self.wait_for(lambda: self.engine.keyed(cid), KEY_WAIT_S)

    def _queue(self, cid: str, texts: Sequence[str], key: str | None) -> list[SentMessage]:
        self._raise_fatal()
        self._wait_keyed(cid)
        out, sync = self._texts.queue(cid, texts, key=key)
        self._wake()
        if sync:
            try:
                self.state.sync()
            except KeyStoreError as exc:
                self._worker.fatal = exc  # the worker publishes nothing it cannot sync either
                raise
        return out

    def mark_read(self, cid: str) -> int:
        """Mark received texts of ``cid`` read; queue read receipts. How many."""
        with self.state.transaction() as tx:
            keys = tx.mark_read(cid)
        if self.options.read_receipts and keys:
            self._receipts.add(cid, ReceiptType.READ, keys)
        return len(keys)

    # -- conversations ----------------------------------------------------------------

    def fetch_bundles(self, pids: Iterable[str], timeout: float = 10.0) -> None:
        """Learn the bundles of ``pids`` (retained on ``p/{pid}/bundle``).

        Raises:
            UnknownParticipant: a bundle did not arrive in time.
        """
        self._changes.fetch_bundles(pids, timeout)

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
        return self._changes.create(members, policy, timeout)

    def invite(self, cid: str, pids: Sequence[str], *, timeout: float = 10.0) -> None:
        """Add members (admins only): a new epoch listing them, keys granted.

        Raises:
            UnknownConversation, NotAMember: no such conversation, or we are no admin.
            UnknownParticipant: a bundle could not be fetched.
        """
        self._changes.invite(cid, pids, timeout)

    def remove(self, cid: str, pids: Sequence[str]) -> None:
        """Remove members (admins only): a new epoch, every remaining member re-keys.

        Raises:
            UnknownConversation, NotAMember: no such conversation, or we are no admin.
        """
        self._changes.remove(cid, pids)

    def set_policy(self, cid: str, policy: Policy) -> None:
        """Change the conversation's policy (admins only, a new epoch)."""
        self._changes.set_policy(cid, policy)

    def update(self) -> None:
        """Recover from a suspected copy of this device's state (PROTOCOL.md §6.7): a
        new prekey (the old ones deleted), and a new epoch of every conversation keyed
        to it — issued here where we are an admin, asked of an admin elsewhere.

        Raises:
            KeyStoreError: the new prekey could not be written.
        """
        self._changes.update()

    def leave(self, cid: str) -> None:
        """Leave ``cid``: an admin removes us from the next epoch.

        An admin leaving publishes that roster itself (handing admin on if needed).

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
            EpochKeyPending: a new epoch's secret did not arrive within KEY_WAIT_S
                (the LEAVE is sealed in the current epoch, as a text is).
        """
        self._wait_keyed(cid)
        self._changes.leave(cid)

    def conversations(self) -> list[ConversationInfo]:
        return conversation_infos(self.engine)

    def verify(self, pid: str, fingerprint: str) -> bool:
        """Compare ``pid``'s fingerprint with one read out of band; mark it verified.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        if not same_fingerprint(self.fingerprint(pid), fingerprint):
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
        return self._receipts.pending

    def undelivered(self, cid: str) -> int:
        """Own messages of the current epoch some current member has not receipted yet."""
        return undelivered_count(self.engine, self.state, cid)

    def gaps(self, cid: str | None = None) -> list[Gap]:
        return self.state.gaps(cid)

    # -- helpers ----------------------------------------------------------------------

    def _wake(self) -> None:
        self._worker.wake()

    def _emit(self, event: Event) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # an application callback must not stop delivery
            log.exception("on_event callback failed")

    def _raise_fatal(self) -> None:
        fatal = self._worker.fatal
        if fatal is not None:
            raise KeyStoreError(f"the device stopped after a state file failure: {fatal}")
