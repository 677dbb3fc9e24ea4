"""Framing shared by the signed key-distribution objects (bundle, roster, grant).

    version u8 | kind u8 | msgpack array body | Ed25519 signature (64)

The signature covers everything before it. Only this module frames these bytes.
"""

from __future__ import annotations

from typing import Any

from fieldchat.schemas import _codec
from fieldchat.schemas.envelope import SIGNATURE_BYTES, VERSION
from fieldchat.schemas.errors import UnsupportedVersion, WireError
from fieldchat.schemas.kinds import ObjectKind


def to_be_signed(kind: ObjectKind, body: Any) -> bytes:
    return bytes((VERSION, kind)) + _codec.pack(body)


def split(data: bytes, kind: ObjectKind, count: int) -> tuple[tuple[Any, ...], bytes, bytes]:
    """Return ``(body fields, signed bytes, signature)``.

    Raises:
        UnsupportedVersion: first byte is not VERSION (checked first).
        WireError: wrong kind, truncated, or a body of the wrong shape.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{kind.name.lower()} must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise WireError(f"empty {kind.name.lower()}")
    if data[0] != VERSION:
        raise UnsupportedVersion(f"unsupported {kind.name.lower()} version 0x{data[0]:02x}")
    if len(data) < 2 + 1 + SIGNATURE_BYTES or data[1] != kind:
        raise WireError(f"not a {kind.name.lower()}")
    signed, signature = data[:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]
    body = _codec.fields(_codec.unpack(signed[2:], kind.name.lower()), count, kind.name.lower())
    return body, signed, signature
