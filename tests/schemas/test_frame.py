"""Frames (PROTOCOL.md §3.4): envelopes round-trip in order, one envelope travels bare,
and every malformed frame is refused whole with a typed error."""

from __future__ import annotations

import pytest

from fieldchat.schemas import _varint
from fieldchat.schemas.errors import LimitExceeded, WireError
from fieldchat.schemas.frame import (
    FRAME_MARKER,
    MAX_FRAME_BYTES,
    MAX_FRAME_ENVELOPES,
    is_frame,
    pack_frame,
    part_bytes,
    split,
)

MARK = bytes((FRAME_MARKER,))


def _envelope(n: int, size: int = 90) -> bytes:
    return b"\x01" + n.to_bytes(2, "big") + bytes(size - 3)


def test_envelopes_round_trip_in_order() -> None:
    envelopes = [_envelope(i, 60 + i * 7) for i in range(MAX_FRAME_ENVELOPES)]
    frame = pack_frame(envelopes)
    assert frame[0] == FRAME_MARKER
    assert split(frame) == envelopes
    assert len(frame) == 1 + sum(part_bytes(len(e)) for e in envelopes)


def test_one_envelope_travels_bare_and_a_bare_payload_is_one_envelope() -> None:
    one = _envelope(1)
    assert pack_frame([one]) == one
    assert split(one) == [one]
    assert split(b"") == [b""]  # judged by the envelope parser, not here


@pytest.mark.parametrize("size", [1, 127, 128, 16_383, 16_384, 60_000])
def test_part_bytes_is_the_encoded_size(size: int) -> None:
    assert part_bytes(size) == len(_varint.encode(size)) + size


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (MARK, "at least 2"),
        (MARK + b"\x03" + _envelope(1, 3), "at least 2"),
        (MARK + b"\x03" + _envelope(1, 3) + b"\x05\x01\x02", "truncated frame"),
        (MARK + b"\x03" + _envelope(1, 3) + b"\x00", "empty envelope"),
        (MARK + b"\x03" + _envelope(1, 3) + b"\x80", "truncated varint"),
        (MARK + b"\x83\x00" + _envelope(1, 3), "non-minimal varint"),
        (MARK + b"\x03" + _envelope(1, 3) + b"\x03" + MARK + b"\x01\x01", "nested frame"),
    ],
)
def test_a_malformed_frame_is_refused_whole(payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        split(payload)


def test_limits_are_enforced_on_both_sides() -> None:
    many = [_envelope(i, 4) for i in range(MAX_FRAME_ENVELOPES + 1)]
    with pytest.raises(LimitExceeded):
        pack_frame(many)
    with pytest.raises(LimitExceeded, match="more than 64"):
        split(MARK + b"".join(b"\x04" + e for e in many))
    big = [_envelope(i, 40_000) for i in range(2)]
    with pytest.raises(LimitExceeded):
        pack_frame(big)
    with pytest.raises(LimitExceeded):
        split(MARK + bytes(MAX_FRAME_BYTES))
    with pytest.raises(WireError):
        pack_frame([])
    with pytest.raises(WireError):
        pack_frame([_envelope(1), b""])


def test_a_frame_is_told_from_an_envelope_by_its_first_byte() -> None:
    one, two = _envelope(1), _envelope(2)
    assert is_frame(pack_frame([one, two]))
    assert not is_frame(pack_frame([one])) and not is_frame(b"")
