"""How the device groups its outbox into frames (PROTOCOL.md §3.4), row by row."""

from __future__ import annotations

from fieldchat.device.outbox import frames as _frames
from fieldchat.device.rows import OutboxKind, OutboxRow
from fieldchat.schemas.frame import MAX_FRAME_BYTES, pack_frame

MSG = "fc/v1/c/" + "a" * 26 + "/msg"
OTHER = "fc/v1/c/" + "b" * 26 + "/msg"


def _row(seq: int, size: int = 100, topic: str = MSG, what: str = "msg", retain: bool = False):
    return OutboxRow(seq, topic, b"\x01" + bytes(size - 1), retain, None, OutboxKind(what), 0.0)


def _seqs(groups: list[list[OutboxRow]]) -> list[list[int]]:
    return [[r.seq for r in g] for g in groups]


def test_consecutive_envelopes_of_one_conversation_share_a_frame() -> None:
    rows = [_row(i) for i in range(130)]
    assert _seqs(_frames(rows, 10, 64)) == [
        list(range(64)),
        list(range(64, 128)),
        [128, 129],
    ]
    assert _seqs(_frames(rows, 2, 64)) == [list(range(64)), list(range(64, 128))]  # the window
    assert _seqs(_frames(rows[:3], 10, 1)) == [[0], [1], [2]]  # frame_envelopes=1


def test_other_topics_rosters_and_retained_rows_travel_alone_in_order() -> None:
    rows = [
        _row(1),
        _row(2, topic=OTHER),
        _row(3, topic=OTHER, what="receipt"),
        _row(4, topic="fc/v1/c/" + "b" * 26 + "/roster", what="roster", retain=True),
        _row(5, topic=OTHER),
        _row(6),
    ]
    assert _seqs(_frames(rows, 10, 64)) == [[1], [2, 3], [4], [5], [6]]


def test_a_frame_stays_within_the_byte_budget() -> None:
    big = [_row(i, size=15_000) for i in range(6)]
    groups = _frames(big, 10, 64)
    assert _seqs(groups) == [[0, 1, 2, 3], [4, 5]]
    assert all(len(pack_frame([r.payload for r in g])) <= MAX_FRAME_BYTES for g in groups)
    # a broker announcing a 20 KB Maximum Packet Size: each 15 KB envelope alone
    assert _seqs(_frames(big, 10, 64, budget=20_000)) == [[i] for i in range(6)]
    small = [_row(i, size=100) for i in range(10)]
    exact = 1 + 3 * 101  # three 100-byte envelopes and their one-byte lengths
    assert _seqs(_frames(small, 10, 64, budget=exact)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
