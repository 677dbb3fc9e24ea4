"""Unsigned LEB128 varints, canonical form only (PROTOCOL.md §3.1).

Header numbers are small (epoch, member index, chain, step), so one or two bytes
usually carry them; a non-minimal encoding is rejected so that each header has
exactly one byte form (signatures and dedupe keys depend on that).
"""

from __future__ import annotations

from fieldchat.schemas.errors import LimitExceeded, WireError

MAX_VARINT_BYTES = 4
MAX_VARINT = (1 << (7 * MAX_VARINT_BYTES)) - 1  # 268,435,455


def encode(value: int) -> bytes:
    """Encode ``value`` (0 ≤ value ≤ MAX_VARINT).

    Raises:
        LimitExceeded: out of range.
    """
    if value < 0x80:
        if value < 0:
            raise LimitExceeded(f"varint {value} is negative")
        return bytes((value,))
    if value > MAX_VARINT:
        raise LimitExceeded(f"varint {value} exceeds {MAX_VARINT}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode(data: bytes, offset: int) -> tuple[int, int]:
    """Decode one varint at ``offset``; return ``(value, next_offset)``.

    Raises:
        WireError: truncated, longer than MAX_VARINT_BYTES, or not minimal.
    """
    value = 0
    shift = 0
    end = min(len(data), offset + MAX_VARINT_BYTES)
    pos = offset
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and pos - offset > 1:
                raise WireError("non-minimal varint")
            return value, pos
        shift += 7
    if pos - offset >= MAX_VARINT_BYTES:
        raise WireError("varint too long")
    raise WireError("truncated varint")
