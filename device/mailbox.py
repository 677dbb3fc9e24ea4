"""What other threads hand the device's worker, and how it tells them a turn is done.

paho's thread (the :class:`~fieldchat.device.link.LinkHandler` callbacks), the history
thread (fetched and archived results) and the application's threads (a wake-up when
the outbox or the subscriptions changed) only enqueue here; the worker takes what
arrived in batches (:meth:`Mailbox.take`) and notifies :attr:`Mailbox.changed` after
each turn, which is what ``Device.wait_for`` and ``wait_connected`` wait on.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass

from fieldchat.device.link import LinkConnection, PubackRefusal
from fieldchat.device.rounds import Archived
from fieldchat.device.tail import Fetched
from fieldchat.schemas.errors import TransportError

__all__ = [
    "BATCH",
    "MAX_QUEUE",
    "Acked",
    "Arrived",
    "Down",
    "Item",
    "Mailbox",
    "Stop",
    "SubscribeRefused",
    "Up",
    "Wake",
]

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


class Mailbox:
    """The worker's queue (bounded: a full one blocks paho's thread, which is the
    backpressure on the broker) and its after-turn condition; the link's handler."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Item] = queue.Queue(MAX_QUEUE)
        self.changed = threading.Condition()  # notified after every turn
        self.closed = False

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

    def take(self) -> list[Item]:
        """One turn's items: what arrived within a tick, at most :data:`BATCH`."""
        items: list[Item] = []
        with contextlib.suppress(queue.Empty):
            items.append(self._queue.get(timeout=_TICK_S))
        while items and len(items) < BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def turned(self) -> None:
        """A turn is done: wake whoever waits for progress."""
        with self.changed:
            self.changed.notify_all()

    # -- the link handler (paho thread: enqueue only) ----------------------------------

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
        self.turned()  # wait_connected waits for the SUBACKs

    def link_failed(self, error: TransportError) -> None:  # noqa: ARG002 - read via the link
        self.turned()
