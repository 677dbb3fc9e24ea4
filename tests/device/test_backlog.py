"""The bounded event queue behind ``AsyncDevice.events()``: what a slow reader sees."""

from __future__ import annotations

import pytest

from fieldchat.device.backlog import Backlog
from fieldchat.device.events import Connected, EventsDropped, MessageReceived, ReceiptKind
from fieldchat.device.events import ReceiptReceived as Receipt


def message(row: int) -> MessageReceived:
    return MessageReceived(row, "cid", "sender", f"m{row}", 0, 0, 0, 0, row, True)


def drain(backlog: Backlog) -> list[object]:
    return [backlog.pop() for _ in range(len(backlog))]


def test_within_its_limit_a_backlog_is_a_plain_fifo() -> None:
    backlog = Backlog(3)
    assert [backlog.push(message(i)) for i in (1, 2, 3)] == [True, True, True]
    assert drain(backlog) == [message(1), message(2), message(3)]
    assert backlog.dropped == 0
    with pytest.raises(IndexError):
        backlog.pop()


def test_past_its_limit_one_marker_stands_where_events_went_missing() -> None:
    backlog = Backlog(2)
    receipt = Receipt("cid", "peer", ReceiptKind.DELIVERED, 1)
    for event in (message(1), message(2), message(3), receipt, message(5)):
        backlog.push(event)
    assert backlog.dropped == 3
    assert len(backlog) == 3  # two events and one marker: memory stays bounded
    # The reader catches up: events after the gap land after the marker, in order.
    assert backlog.pop() == message(1)
    backlog.push(message(6))
    assert drain(backlog) == [
        message(2),
        EventsDropped(count=3, messages=2, first_id=3, last_id=5),
        message(6),
    ]


def test_a_new_gap_after_a_kept_event_gets_its_own_marker() -> None:
    backlog = Backlog(1)
    backlog.push(message(1))
    backlog.push(message(2))  # dropped
    assert backlog.pop() == message(1)
    backlog.push(message(3))  # kept, after the first marker
    backlog.push(Connected("5", session_present=True))  # dropped: a marker without rows
    assert drain(backlog) == [
        EventsDropped(count=1, messages=1, first_id=2, last_id=2),
        message(3),
        EventsDropped(count=1),
    ]


def test_the_marker_reads_as_json_like_the_other_events() -> None:
    assert EventsDropped(4, 2, 10, 11).to_json() == {
        "type": "events_dropped",
        "count": 4,
        "messages": 2,
        "first_id": 10,
        "last_id": 11,
    }


def test_a_backlog_holds_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Backlog(0)
