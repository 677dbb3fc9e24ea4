"""What a :class:`~device.client.Device` reports to its application.

Events are delivered on the device's worker thread, after the state they describe
is durable, in the order they happened. ``to_json`` gives the ``listen --json`` form.
A stream that can fall behind (:meth:`fieldchat.device.aio.AsyncDevice.events`) adds
one more kind, :class:`EventsDropped`, where it had to drop (``StreamEvent``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar

__all__ = [
    "Connected",
    "Disconnected",
    "Event",
    "EventType",
    "EventsDropped",
    "ForgeryDetected",
    "GapDetected",
    "Joined",
    "KeyChanged",
    "MessageReceived",
    "MessageVerified",
    "PresenceChanged",
    "PublishRefused",
    "ReceiptKind",
    "ReceiptReceived",
    "Removed",
    "StreamEvent",
]


class EventType(StrEnum):
    """An event's ``type`` in its JSON form (``listen --json``)."""

    MESSAGE = "message"
    VERIFIED = "verified"
    FORGERY = "forgery"
    RECEIPT = "receipt"
    KEY_CHANGED = "key_changed"
    JOINED = "joined"
    REMOVED = "removed"
    GAP = "gap"
    PUBLISH_REFUSED = "publish_refused"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    PRESENCE = "presence"
    EVENTS_DROPPED = "events_dropped"


class ReceiptKind(StrEnum):
    """What a member's receipt says of our messages."""

    DELIVERED = "delivered"
    READ = "read"


@dataclass(frozen=True, slots=True)
class _Base:
    type: ClassVar[EventType]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True, slots=True)
class MessageReceived(_Base):
    """A text from another member, shown exactly once (``id`` is its local row)."""

    type: ClassVar[EventType] = EventType.MESSAGE
    id: int
    cid: str
    sender: str
    text: str
    sent_at: int
    epoch: int
    sender_index: int
    chain: int
    step: int
    signed: bool
    late: bool = False  # it filled a gap: older than messages already shown
    # Unsigned, in a conversation that signs every Nth step: not authenticated as the
    # sender's yet (any member could have sealed it) until the sender's next signed
    # envelope covers it: MessageVerified or ForgeryDetected follows (PROTOCOL.md §6.5).
    pending: bool = False


@dataclass(frozen=True, slots=True)
class MessageVerified(_Base):
    """Messages shown as pending (``steps`` of a member's chain) are verified: the
    sender's next signed envelope covers exactly what was shown (PROTOCOL.md §6.5)."""

    type: ClassVar[EventType] = EventType.VERIFIED
    cid: str
    sender: str
    epoch: int
    sender_index: int
    chain: int
    steps: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ForgeryDetected(_Base):
    """Messages shown as ``sender``'s (``steps`` of its chain) were NOT sent by it:
    another member holding the chain key forged them, and the sender's next signed
    envelope proves it (PROTOCOL.md §6.5). ``pinpointed``: exactly these steps are
    forged (the sender's own envelopes were found); otherwise at least one of them is.
    Counted as ``coverage_forged``."""

    type: ClassVar[EventType] = EventType.FORGERY
    cid: str
    sender: str
    epoch: int
    sender_index: int
    chain: int
    steps: tuple[int, ...]
    pinpointed: bool


@dataclass(frozen=True, slots=True)
class ReceiptReceived(_Base):
    """A member received (``delivered``) or displayed (``read``) our messages."""

    type: ClassVar[EventType] = EventType.RECEIPT
    cid: str
    sender: str
    kind: ReceiptKind
    steps: int


@dataclass(frozen=True, slots=True)
class KeyChanged(_Base):
    """A known participant's keys changed: compare fingerprints out of band."""

    type: ClassVar[EventType] = EventType.KEY_CHANGED
    pid: str
    previous_fingerprint: str | None
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Joined(_Base):
    """We are a member of a conversation (invited, or a new epoch)."""

    type: ClassVar[EventType] = EventType.JOINED
    cid: str
    epoch: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Removed(_Base):
    type: ClassVar[EventType] = EventType.REMOVED
    cid: str
    epoch: int


@dataclass(frozen=True, slots=True)
class GapDetected(_Base):
    """Steps ``first..last`` of a member's chain are missing (lost or skipped)."""

    type: ClassVar[EventType] = EventType.GAP
    cid: str
    sender: str
    epoch: int
    chain: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class PublishRefused(_Base):
    """The broker refused a publication for good (an MQTT 5 negative PUBACK, e.g.
    0x87 Not authorized: we are not, or no longer, in ``cid`` as the broker sees it).

    The ``messages`` outbox rows it carried (a frame carries several) left the outbox
    and are never published again: not after a reconnect, not to answer a gap request,
    not to the archive. ``what`` is their outbox kind (``msg``: texts and receipts;
    ``roster``; ``grant``).
    """

    type: ClassVar[EventType] = EventType.PUBLISH_REFUSED
    cid: str | None
    topic: str
    what: str
    code: int
    reason: str
    messages: int


@dataclass(frozen=True, slots=True)
class Connected(_Base):
    type: ClassVar[EventType] = EventType.CONNECTED
    protocol: str
    session_present: bool


@dataclass(frozen=True, slots=True)
class Disconnected(_Base):
    type: ClassVar[EventType] = EventType.DISCONNECTED
    reason: str


@dataclass(frozen=True, slots=True)
class PresenceChanged(_Base):
    """A member of one of our conversations came online or went offline (its retained
    status changed; ``offline`` also when its broker published its will). ``at``: when
    this device learnt it (Unix seconds). Reported once per change, never for
    ourselves; none while ``LinkOptions.presence`` is off."""

    type: ClassVar[EventType] = EventType.PRESENCE
    pid: str
    online: bool
    at: int


Event = (
    MessageReceived
    | MessageVerified
    | ForgeryDetected
    | ReceiptReceived
    | KeyChanged
    | Joined
    | Removed
    | GapDetected
    | PublishRefused
    | Connected
    | Disconnected
    | PresenceChanged
)


@dataclass(frozen=True, slots=True)
class EventsDropped(_Base):
    """``count`` events were dropped here because this stream's consumer fell behind
    (its buffer was full); the device itself lost nothing.

    ``messages`` of them were :class:`MessageReceived`, stored rows ``first_id`` to
    ``last_id``: ``Device.messages(after_id=first_id - 1)`` lists them again (with any
    newer ones). Receipts, joins and the rest are in the state file's views too
    (``conversations()``, ``undelivered()``, ``gaps()``).
    """

    type: ClassVar[EventType] = EventType.EVENTS_DROPPED
    count: int
    messages: int = 0
    first_id: int | None = None
    last_id: int | None = None


StreamEvent = Event | EventsDropped
