"""Frames: several envelopes of one conversation in one MQTT PUBLISH (PROTOCOL.md §3.4).

    marker u8 = 0xF1 | (length uv | envelope)+        at least 2, at most 64 envelopes

A device with a backlog (a burst, or an outbox draining after a link came back) sends
it as frames: one PUBLISH, one PUBACK, one topic name and one fixed header for up to
64 envelopes, instead of one each. Each envelope inside is unchanged — sealed, signed,
deduplicated and archived on its own — so a frame is only transport: the gateway stores
and serves the envelopes, never the frame. A payload whose first byte is not the marker
is a single envelope (version 0x01): the two cannot be confused.
"""

from __future__ import annotations

from collections.abc import Sequence

from fieldchat.schemas import _varint
from fieldchat.schemas.envelope import MAX_ENVELOPE_BYTES
from fieldchat.schemas.errors import LimitExceeded, WireError

__all__ = [
    "FRAME_MARKER",
    "MAX_FRAME_BYTES",
    "MAX_FRAME_ENVELOPES",
    "is_frame",
    "pack_frame",
    "part_bytes",
    "split",
]

FRAME_MARKER = 0xF1
MAX_FRAME_ENVELOPES = 64
MAX_FRAME_BYTES = MAX_ENVELOPE_BYTES  # a frame fits wherever one envelope of the limit does
_MARKER = bytes((FRAME_MARKER,))


def pack_frame(envelopes: Sequence[bytes]) -> bytes:
    """The payload carrying ``envelopes`` in order: the envelope itself when there is one.

    Raises:
        LimitExceeded: more than MAX_FRAME_ENVELOPES, or over MAX_FRAME_BYTES in all.
        WireError: no envelope, or an empty one.
    """
    if len(envelopes) == 1:
        return bytes(envelopes[0])
    if not envelopes:
        raise WireError("a frame needs an envelope")
    if len(envelopes) > MAX_FRAME_ENVELOPES:
        raise LimitExceeded(f"frame of {len(envelopes)} envelopes exceeds {MAX_FRAME_ENVELOPES}")
    parts = [bytes((FRAME_MARKER,))]
    for envelope in envelopes:
        if not envelope:
            raise WireError("empty envelope in a frame")
        parts += (_varint.encode(len(envelope)), envelope)
    out = b"".join(parts)
    if len(out) > MAX_FRAME_BYTES:
        raise LimitExceeded(f"frame of {len(out)} bytes exceeds {MAX_FRAME_BYTES}")
    return out


def is_frame(payload: bytes) -> bool:
    """Whether a ``c/{cid}/msg`` payload is a frame rather than one envelope (its first
    byte; :func:`split` does the checks)."""
    return payload[:1] == _MARKER


def part_bytes(size: int) -> int:
    """What an envelope of ``size`` bytes adds to a frame (its length prefix too); a frame
    is 1 byte plus its parts (the packer's budget, without encoding anything)."""
    return size + (1 if size < 0x80 else 2 if size < 0x4000 else 3)


def split(payload: bytes) -> list[bytes]:
    """The envelopes a ``c/{cid}/msg`` payload carries, in order (not yet parsed).

    A payload that is not a frame is returned as the one envelope it is; the envelope
    parser judges it. A frame is judged whole: any flaw refuses all of it.

    Raises:
        WireError: a truncated or non-minimal length, an empty or nested part, or a
            frame of fewer than 2 envelopes (one travels bare).
        LimitExceeded: over MAX_FRAME_BYTES or MAX_FRAME_ENVELOPES.
    """
    if not payload or payload[0] != FRAME_MARKER:
        return [payload]
    size = len(payload)
    if size > MAX_FRAME_BYTES:
        raise LimitExceeded(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    out: list[bytes] = []
    pos = 1
    while pos < size:
        if len(out) == MAX_FRAME_ENVELOPES:
            raise LimitExceeded(f"frame of more than {MAX_FRAME_ENVELOPES} envelopes")
        length, pos = _varint.decode(payload, pos)
        end = pos + length
        if not length or end > size:
            raise WireError("empty envelope in a frame" if not length else "truncated frame")
        if payload[pos] == FRAME_MARKER:
            raise WireError("nested frame")
        out.append(payload[pos:end])
        pos = end
    if len(out) < 2:  # the canonical form: one envelope travels bare
        raise WireError("a frame must carry at least 2 envelopes")
    return out
