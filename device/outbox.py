"""How the outbox leaves: which rows share a frame, and what is in flight (docs/device.md,
"Delivery model"). Pure: :class:`fieldchat.device.client.Device` reads the rows and
publishes; these decide the grouping and remember the packets.

The worker publishes the outbox in order with QoS 1, a window of packets in flight,
and deletes rows only on PUBACK; what is queued for one conversation leaves as frames
of up to ``frame_envelopes`` envelopes a PUBLISH (PROTOCOL.md §3.4).
"""

from __future__ import annotations

from collections.abc import Sequence

from fieldchat.device.rows import ENVELOPE_ROWS, OutboxKind, OutboxRow
from fieldchat.schemas.frame import MAX_FRAME_BYTES, part_bytes
from fieldchat.schemas.roster import is_roster
from fieldchat.schemas.topics import Topic, TopicKind

__all__ = ["PUBLISH_OVERHEAD", "Inflight", "frame_budget", "frames", "kind_of"]

PUBLISH_OVERHEAD = 32  # a PUBLISH's bytes besides topic and payload, generously (MQTT 5)


def kind_of(topic: Topic | None, payload: bytes) -> OutboxKind:
    """The outbox kind of a publication, from its topic and payload (not its retain
    flag: rosters are proposed, not retained, PROTOCOL.md §5.2). Only ``msg`` and
    ``receipt`` rows share frames (§3.4)."""
    if topic is None or topic.kind in (
        TopicKind.ROSTER,
        TopicKind.PROPOSE,
        TopicKind.BUNDLE,  # a rotated prekey (PROTOCOL.md §2.5): alone, as a roster
    ):
        return OutboxKind.ROSTER
    if topic.kind is TopicKind.INBOX:
        return OutboxKind.ROSTER if is_roster(payload) else OutboxKind.GRANT
    return OutboxKind.MSG


def frame_budget(max_packet: int, topic: str) -> int:
    """A frame's bytes under the broker's Maximum Packet Size (0: none announced):
    the topic, fixed header, packet id and properties besides."""
    if not max_packet:
        return MAX_FRAME_BYTES
    return min(MAX_FRAME_BYTES, max_packet - len(topic) - PUBLISH_OVERHEAD)


def frames(
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
        if groups and row.what in ENVELOPE_ROWS and not row.retain:
            group = groups[-1]
            head = group[0]
            if (
                head.what in ENVELOPE_ROWS
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


class Inflight:
    """The PUBLISH packets of one connection awaiting their PUBACK, and where the
    outbox goes on (``cursor``: the next outbox sequence number to publish).

    A new connection starts afresh: everything unacknowledged is published again.
    """

    def __init__(self) -> None:
        self._packets: dict[int, tuple[int, ...]] = {}  # packet id -> outbox seqs it carries
        self.cursor = 0

    def __len__(self) -> int:
        return len(self._packets)

    def reset(self) -> None:
        """A connection came or went: nothing of the old one will be acknowledged."""
        self._packets = {}
        self.cursor = 0

    def room(self, window: int) -> int:
        """How many more packets may leave within ``window``."""
        return max(0, window - len(self._packets))

    def published(self, mid: int, group: Sequence[OutboxRow]) -> None:
        """Packet ``mid`` carries ``group``; the outbox goes on after it."""
        self._packets[mid] = tuple(row.seq for row in group)
        self.cursor = group[-1].seq + 1

    def acknowledged(self, mid: int) -> tuple[int, ...] | None:
        """The outbox rows packet ``mid`` carried (``None``: not one of ours)."""
        return self._packets.pop(mid, None)
