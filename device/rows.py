"""What the state file's tables hold, as typed rows (:mod:`fieldchat.device.state`).

The kinds stored as text or numbers are enums here: an outbox row's kind decides which
rows share a frame (PROTOCOL.md §3.4), a received row's kind what it carried. Both
store their plain value, so state files written before these types read unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

__all__ = [
    "ARCHIVED",
    "ENVELOPE_ROWS",
    "NOT_ARCHIVED",
    "REFUSED",
    "ChainKey",
    "Gap",
    "HeldRow",
    "MessageKind",
    "OutboxKind",
    "OutboxRow",
    "OwnEnvelope",
    "ReceivedRow",
    "SentRow",
    "StepInConversation",
    "Trust",
]

# Own envelopes the archive has not confirmed yet (``archived``: 0 not yet, 1 archived,
# -1 refused for good).
ARCHIVED, NOT_ARCHIVED, REFUSED = 1, 0, -1

ChainKey = tuple[str, int, int, int]  # cid, epoch, sender index, chain
StepInConversation = tuple[int, int, int, int]  # epoch, sender index, chain, step (within a cid)


class OutboxKind(StrEnum):
    """What an outbox row carries (column ``what``): told by topic and kind byte, never
    by the retain flag (rosters are proposed, not retained, PROTOCOL.md §5.2)."""

    MSG = "msg"  # an own text or control on c/{cid}/msg
    RECEIPT = "receipt"  # an own receipt (delivered, read, missing) on c/{cid}/msg
    ROSTER = "roster"  # a roster proposal, or an earlier roster sent to an invitee
    GRANT = "grant"  # a grant to a member's inbox


# Rows on c/{cid}/msg: the only ones that share frames (§3.4).
ENVELOPE_ROWS = frozenset({OutboxKind.MSG, OutboxKind.RECEIPT})


class MessageKind(IntEnum):
    """What a received envelope carried (column ``kind`` of ``received``)."""

    TEXT = 1
    RECEIPT = 2
    CONTROL = 3


@dataclass(frozen=True, slots=True)
class OwnEnvelope:
    """An own envelope to reconcile with the archive (``sent`` or ``kept``)."""

    cid: str
    epoch: int
    sender_index: int
    chain: int
    step: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    cid: str | None
    what: OutboxKind
    created_at: float


@dataclass(frozen=True, slots=True)
class SentRow:
    id: int
    cid: str
    epoch: int
    chain: int
    step: int
    text: str
    sent_at: float
    published_at: float | None


class Trust(IntEnum):
    """Who a received message is known to come from (PROTOCOL.md §6.5), as stored.

    ``AUTHENTIC``: signed, or in a conversation that does not sign every Nth step
    (what rows written before delayed authentication hold). ``PENDING``: unsigned, any
    member could have sealed it, until the sender's next signed envelope covers it:
    then ``VERIFIED``, or ``FORGED`` (another member sealed it in the sender's name).
    """

    AUTHENTIC = 0
    PENDING = 1
    VERIFIED = 2
    FORGED = 3


@dataclass(frozen=True, slots=True)
class ReceivedRow:
    """One stored message of another member (``text`` is ``None`` for receipts/controls)."""

    id: int
    cid: str
    epoch: int
    sender_index: int
    chain: int
    step: int
    sender: str
    kind: int
    sent_at: int | None
    text: str | None
    received_at: float
    read: bool
    trust: Trust = Trust.AUTHENTIC

    def to_json(self) -> dict[str, object]:
        """The message in the form of its ``message`` event (``listen --json``, the
        daemon's ``messages``): the ids that name it on every device and its row ``id``."""
        return {
            "type": "message",
            "id": self.id,
            "cid": self.cid,
            "sender": self.sender,
            "text": self.text,
            "sent_at": self.sent_at,
            "epoch": self.epoch,
            "sender_index": self.sender_index,
            "chain": self.chain,
            "step": self.step,
            "trust": self.trust.name.lower(),  # PROTOCOL.md §6.5
        }


@dataclass(frozen=True, slots=True)
class HeldRow:
    """A held envelope: waiting for a key (``until`` None) or for a missing step."""

    id: int
    cid: str
    payload: bytes
    until: float | None


@dataclass(frozen=True, slots=True)
class Gap:
    """Steps ``first..last`` of one sender chain that have not arrived (yet)."""

    cid: str
    epoch: int
    sender_index: int
    chain: int
    first: int
    last: int
    sender: str
    since: float


@dataclass(frozen=True, slots=True)
class UnconfirmedRow:
    """A published own text still keeping its ciphertext (``Device`` resends it)."""

    id: int
    cid: str
    topic: str
    payload: bytes
    epoch: int
    chain: int
    step: int
