"""What a :class:`~device.client.Device` reports to its application.

Events are delivered on the device's worker thread, after the state they describe
is durable, in the order they happened. ``to_json`` gives the ``listen --json`` form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

__all__ = [
    "Connected",
    "Disconnected",
    "Event",
    "GapDetected",
    "Joined",
    "KeyChanged",
    "MessageReceived",
    "PublishRefused",
    "ReceiptReceived",
    "Removed",
]


@dataclass(frozen=True, slots=True)
class _Base:
    type: ClassVar[str] = "event"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True, slots=True)
class MessageReceived(_Base):
    """A text from another member, shown exactly once (``id`` is its local row)."""

    type: ClassVar[str] = "message"
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


@dataclass(frozen=True, slots=True)
class ReceiptReceived(_Base):
    """A member received (``delivered``) or displayed (``read``) our messages."""

    type: ClassVar[str] = "receipt"
    cid: str
    sender: str
    kind: str
    steps: int


@dataclass(frozen=True, slots=True)
class KeyChanged(_Base):
    """A known participant's keys changed: compare fingerprints out of band."""

    type: ClassVar[str] = "key_changed"
    pid: str
    previous_fingerprint: str | None
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Joined(_Base):
    """We are a member of a conversation (invited, or a new epoch)."""

    type: ClassVar[str] = "joined"
    cid: str
    epoch: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Removed(_Base):
    type: ClassVar[str] = "removed"
    cid: str
    epoch: int


@dataclass(frozen=True, slots=True)
class GapDetected(_Base):
    """Steps ``first..last`` of a member's chain are missing (lost or skipped)."""

    type: ClassVar[str] = "gap"
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

    type: ClassVar[str] = "publish_refused"
    cid: str | None
    topic: str
    what: str
    code: int
    reason: str
    messages: int


@dataclass(frozen=True, slots=True)
class Connected(_Base):
    type: ClassVar[str] = "connected"
    protocol: str
    session_present: bool


@dataclass(frozen=True, slots=True)
class Disconnected(_Base):
    type: ClassVar[str] = "disconnected"
    reason: str


Event = (
    MessageReceived
    | ReceiptReceived
    | KeyChanged
    | Joined
    | Removed
    | GapDetected
    | PublishRefused
    | Connected
    | Disconnected
)
