"""MQTT data representations (§1.5): Variable Byte Integer, UTF-8 string, binary data.

The one place the MQTT Variable Byte Integer is written (``fieldchat.schemas._varint`` is the
envelope's LEB128, with its own canonical-form rule). MQTT allows at most four bytes
(268,435,455) and, unlike the envelope, accepts a non-minimal encoding on input
(§1.5.5 only says the encoder uses the minimum; rejecting would refuse packets of
some clients that other brokers accept).
"""

from __future__ import annotations

from fieldchat.schemas import _varint
from fieldchat.schemas.errors import LimitExceeded, MalformedPacket

__all__ = [
    "MAX_VARINT",
    "binary",
    "encode_varint",
    "read_binary",
    "read_string",
    "read_varint",
    "string",
]

MAX_VARINT = _varint.MAX_VARINT  # 268,435,455: four bytes of seven bits (§1.5.5)


def encode_varint(value: int) -> bytes:
    """Encode a Variable Byte Integer: the same bytes as the envelope's LEB128 (seven
    bits a byte, low first, four at most), so its encoder serves.

    Raises:
        MalformedPacket: negative or above :data:`MAX_VARINT`.
    """
    if 0 <= value < 0x80:
        return bytes((value,))
    try:
        return _varint.encode(value)
    except LimitExceeded:
        raise MalformedPacket(f"{value} does not fit a variable byte integer") from None


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a Variable Byte Integer at ``pos``; return ``(value, next position)``.

    Raises:
        MalformedPacket: truncated or longer than four bytes.
    """
    value = shift = 0
    for i in range(pos, min(pos + 4, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    if len(data) - pos >= 4:
        raise MalformedPacket("variable byte integer longer than four bytes")
    raise MalformedPacket("truncated variable byte integer")


def string(text: str) -> bytes:
    """A UTF-8 Encoded String (§1.5.4).

    Raises:
        MalformedPacket: longer than 65,535 bytes once encoded, holding U+0000 or a
            surrogate code point.
    """
    if "\x00" in text:  # MQTT-1.5.4-2
        raise MalformedPacket("a string may not contain U+0000")
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate (MQTT-1.5.4-1)
        raise MalformedPacket("a string may not contain surrogate code points") from None
    return binary(raw)


def binary(raw: bytes) -> bytes:
    """Binary Data (§1.5.6): two length bytes, then the bytes.

    Raises:
        MalformedPacket: longer than 65,535 bytes.
    """
    if len(raw) > 0xFFFF:
        raise MalformedPacket(f"{len(raw)} bytes do not fit a two-byte length")
    return len(raw).to_bytes(2, "big") + raw


def read_binary(data: bytes, pos: int, what: str, end: int | None = None) -> tuple[bytes, int]:
    """Binary Data at ``pos`` (not past ``end``); return ``(bytes, next position)``.

    Raises:
        MalformedPacket: truncated.
    """
    limit = len(data) if end is None else end
    if pos + 2 > limit:
        raise MalformedPacket(f"truncated {what}")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > limit:
        raise MalformedPacket(f"truncated {what}")
    return bytes(data[pos + 2 : stop]), stop


def read_string(data: bytes, pos: int, what: str, end: int | None = None) -> tuple[str, int]:
    """A UTF-8 Encoded String at ``pos``; return ``(text, next position)``.

    Raises:
        MalformedPacket: truncated, not UTF-8 (MQTT-1.5.4-1) or holding U+0000
            (MQTT-1.5.4-2).
    """
    raw, pos = read_binary(data, pos, what, end)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket(f"{what} contains U+0000")
    return text, pos
