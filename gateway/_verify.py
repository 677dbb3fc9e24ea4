"""Classification and verification of what arrives on the gateway's subscriptions.

The gateway holds no keys: it checks structure and signatures only. These functions
are synchronous and CPU-bound (Ed25519 verifies, ≈ 40 µs each with libsodium); the
archiver runs batches of them in worker threads — PyNaCl releases the GIL while
libsodium verifies, so threads verify in parallel.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from fieldchat.schemas import MAX_ENVELOPE_BYTES, Bundle, Envelope, Grant, Roster, TopicKind, Topics
from fieldchat.schemas.delivery import Delivery, is_delivery
from fieldchat.schemas.envelope import parse, verify_signature
from fieldchat.schemas.errors import (
    CryptoError,
    FieldchatError,
    InvalidId,
    LimitExceeded,
    WireError,
)
from fieldchat.schemas.frame import is_frame, split
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.roster import is_roster
from fieldchat.schemas.topics import Topic

__all__ = [
    "MAX_STATUS_BYTES",
    "Parsed",
    "Rejected",
    "TopicCache",
    "classify",
    "classify_all",
    "verify_signatures",
]

MAX_STATUS_BYTES = 1024  # presence payloads are tiny; anything larger is refused
_MAX_OBJECT_BYTES = 16_384  # bundles (1.3 KB with ML-KEM), rosters (≤ 256 members), grants
_TOPIC_CACHE_MAX = 50_000
_MSG_SUFFIX = "/" + TopicKind.MSG.value
_ROSTER_KINDS = (TopicKind.ROSTER, TopicKind.PROPOSE)


class TopicCache:
    """``Topics.parse`` with the answers kept (bounded, least recently added dropped).

    Every message names its topic, and one conversation's topic repeats for each of
    its envelopes: parsing and validating the ids again cost more than a dict lookup.
    Refused topics are not kept (a flood of bad names must not evict good ones).
    """

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._known: OrderedDict[str, Topic] = OrderedDict()

    def parse(self, topic: str) -> Topic:
        """Raises: InvalidId (see ``Topics.parse``)."""
        found = self._known.get(topic)
        if found is None:
            found = self._known[topic] = self.topics.parse(topic)
            if len(self._known) > _TOPIC_CACHE_MAX:
                self._known.popitem(last=False)
        return found


@dataclass(frozen=True, slots=True)
class Rejected:
    """Refused input; ``reason`` labels the rejection counter."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Parsed:
    """One received message after the structural checks (and, for signed key objects,
    their signature check): exactly one of the payload fields is set.

    A roster comes on ``c/{cid}/roster``, on ``c/{cid}/propose`` or, sent by an admin
    to a new member with the earlier rosters of its chain, on ``p/{pid}/inbox``
    (``kind`` says which; ``roster`` is set, ``grant`` is not)."""

    kind: TopicKind
    data: bytes
    received_at: float
    cid: str | None = None
    pid: str | None = None
    envelope: Envelope | None = None
    roster: Roster | None = None
    bundle: Bundle | None = None
    grant: Grant | None = None
    delivery: Delivery | None = None  # an epoch secret, sealed: only its recipient opens it
    cleared: bool = False  # empty retained payload: a retained message was deleted


def classify(  # noqa: PLR0911, PLR0912 - one outcome per topic kind, flat on purpose
    topics: Topics | TopicCache, topic: str, data: bytes, received_at: float
) -> Parsed | Rejected:
    """Parse one message by its topic; never raises.

    Bundles, rosters and grants are decoded with their signatures checked (their
    ``from_bytes`` does it); envelopes are only parsed here, their signature needs the
    sender's bundle (see :func:`verify_signatures`). An inbox payload is a grant or a
    roster, told apart by its kind byte (PROTOCOL.md §3).
    """
    try:
        where = topics.parse(topic)
    except InvalidId:
        return Rejected("topic", topic[:80])
    try:
        if where.kind is TopicKind.MSG:
            if len(data) > MAX_ENVELOPE_BYTES:
                raise LimitExceeded("envelope too large")
            envelope, _ = parse(data)
            return Parsed(where.kind, data, received_at, cid=where.cid, envelope=envelope)
        if not data and where.kind in (TopicKind.BUNDLE, TopicKind.ROSTER, TopicKind.STATUS):
            return Parsed(where.kind, data, received_at, cid=where.cid, pid=where.pid, cleared=True)
        if where.kind is TopicKind.STATUS:
            if len(data) > MAX_STATUS_BYTES:
                raise LimitExceeded("status too large")
            return Parsed(where.kind, data, received_at, pid=where.pid)
        if len(data) > _MAX_OBJECT_BYTES:
            raise LimitExceeded("object too large")
        if where.kind is TopicKind.BUNDLE:
            bundle = Bundle.from_bytes(data)
            if bundle.pid != where.pid:
                return Rejected("wrong_topic", "bundle of another pid")
            return Parsed(where.kind, data, received_at, pid=where.pid, bundle=bundle)
        if where.kind in _ROSTER_KINDS:
            roster = Roster.from_bytes(data)
            if roster.cid != where.cid:
                return Rejected("wrong_topic", "roster of another conversation")
            return Parsed(where.kind, data, received_at, cid=where.cid, roster=roster)
        if is_roster(data):
            roster = Roster.from_bytes(data)
            return Parsed(
                where.kind, data, received_at, pid=where.pid, cid=roster.cid, roster=roster
            )
        if is_delivery(data):
            delivery = Delivery.from_bytes(data)
            return Parsed(
                where.kind, data, received_at, pid=where.pid, cid=delivery.cid, delivery=delivery
            )
        grant = Grant.from_bytes(data)
        if grant.recipient != where.pid:
            return Rejected("wrong_topic", "grant for another recipient")
        return Parsed(where.kind, data, received_at, pid=where.pid, cid=grant.cid, grant=grant)
    except FieldchatError as exc:
        return Rejected(exc.reason, str(exc)[:120])
    except (ValueError, TypeError) as exc:  # defence in depth: schemas maps its own errors
        return Rejected(WireError.reason, type(exc).__name__)


def classify_all(
    topics: Topics | TopicCache, topic: str, data: bytes, received_at: float
) -> list[Parsed | Rejected]:
    """:func:`classify` for what MQTT delivers: a frame's envelopes (PROTOCOL.md §3.4)
    each become their own outcome, as if published one by one; never raises."""
    if not is_frame(data) or not topic.endswith(_MSG_SUFFIX):
        return [classify(topics, topic, data, received_at)]
    try:
        parts = split(data)
    except FieldchatError as exc:
        return [Rejected(exc.reason, f"frame: {str(exc)[:100]}")]
    return [classify(topics, topic, part, received_at) for part in parts]


@lru_cache(maxsize=4096)
def _cid_bytes(cid: str) -> bytes:
    return decode_id(cid, "cid")


def verify_signatures(jobs: list[tuple[Envelope, bytes, str, bytes]]) -> list[str | None]:
    """Verify ``(parsed envelope, its bytes, cid, signer Ed25519 key)`` jobs; ``None``
    or a rejection reason each.

    The check of ``schemas.envelope.verify_envelope_signature`` on an envelope that
    :func:`classify` parsed already, with the cid's bytes cached: parsing again and
    decoding the cid cost ≈ 12 µs an envelope, on top of a ≈ 105 µs verify.
    """
    out: list[str | None] = []
    for envelope, data, cid, key in jobs:
        try:
            if envelope.signature is None:
                raise CryptoError("authentication failed")
            verify_signature(data, _cid_bytes(cid), key)
        except FieldchatError as exc:
            out.append(exc.reason)
        else:
            out.append(None)
    return out
