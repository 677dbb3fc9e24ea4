"""What the outbox remembers in flight and how rows are told apart (device.outbox)."""

from __future__ import annotations

from fieldchat.device.outbox import PUBLISH_OVERHEAD, Inflight, frame_budget, kind_of
from fieldchat.device.rows import OutboxKind, OutboxRow
from fieldchat.schemas import Topics
from fieldchat.schemas.frame import MAX_FRAME_BYTES

TOPICS = Topics("fc")
CID = "a" * 26


def _row(seq: int) -> OutboxRow:
    return OutboxRow(seq, TOPICS.msg(CID), b"\x01", False, CID, OutboxKind.MSG, 0.0)


def test_packets_in_flight_fill_the_window_and_leave_on_puback() -> None:
    inflight = Inflight()
    assert inflight.room(2) == 2
    inflight.published(7, [_row(1), _row(2)])
    assert inflight.cursor == 3
    inflight.published(8, [_row(3)])
    assert inflight.room(2) == 0
    assert inflight.acknowledged(7) == (1, 2)
    assert inflight.acknowledged(7) is None  # not ours (any more)
    assert inflight.room(2) == 1
    inflight.reset()  # a new connection publishes everything unacknowledged again
    assert (len(inflight), inflight.cursor) == (0, 0)


def test_rows_are_told_apart_by_topic_and_payload_not_retain() -> None:
    assert kind_of(TOPICS.parse(TOPICS.msg(CID)), b"") is OutboxKind.MSG
    assert kind_of(TOPICS.parse(TOPICS.roster(CID)), b"") is OutboxKind.ROSTER
    assert kind_of(TOPICS.parse(TOPICS.inbox(CID)), b"\x00") is OutboxKind.GRANT
    assert kind_of(None, b"") is OutboxKind.ROSTER
    assert str(OutboxKind.MSG) == "msg"  # stored as before: old state files read unchanged


def test_a_broker_maximum_packet_size_bounds_the_frame() -> None:
    assert frame_budget(0, "t") == MAX_FRAME_BYTES
    assert frame_budget(1000, "topic") == 1000 - len("topic") - PUBLISH_OVERHEAD
