"""Participant and conversation ids: 16 bytes, shown as lowercase base32 without padding.

A ``pid`` is the first 16 bytes of SHA-256 of the participant's Ed25519 public key
(self-certifying, PROTOCOL.md §2.1); a ``cid`` is the first 16 bytes of SHA-256 over
the creator's pid and a nonce carried in the epoch-0 roster (PROTOCOL.md §5.1), so
anyone can check who founded a conversation. Both are 26 characters of ``[a-z2-7]``.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fieldchat.schemas.errors import InvalidId

__all__ = [
    "ID_BYTES",
    "ID_CHARS",
    "cid_for",
    "decode_id",
    "encode_id",
    "is_valid_id",
    "pid_for",
    "validate_id",
]

ID_BYTES = 16
ID_CHARS = 26  # ceil(16 * 8 / 5)
_ID_RE = re.compile(r"[a-z2-7]{26}")
# 16 bytes = 128 bits; 26 base32 chars hold 130, so the last char carries 2 zero bits.
_LAST_CHAR_OK = frozenset("aeimquy4")

PID_LABEL = b"fieldchat pid v1"
CID_LABEL = b"fieldchat cid v1"


def encode_id(raw: bytes) -> str:
    """Return the text form of a 16-byte id.

    Raises:
        InvalidId: ``raw`` is not 16 bytes.
    """
    if len(raw) != ID_BYTES:
        raise InvalidId(f"an id is {ID_BYTES} bytes, got {len(raw)}")
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def is_valid_id(text: object) -> bool:
    """True when ``text`` is the canonical text form of a 16-byte id."""
    return (
        isinstance(text, str) and _ID_RE.fullmatch(text) is not None and text[-1] in _LAST_CHAR_OK
    )


def validate_id(text: object, what: str = "id") -> str:
    """Return ``text`` when it is a canonical id.

    Raises:
        InvalidId: not 26 lowercase base32 characters in canonical form.
    """
    if not is_valid_id(text):
        shown = text[:40] if isinstance(text, str) else type(text).__name__
        raise InvalidId(f"invalid {what} {shown!r}: expected 26 characters of a-z and 2-7")
    assert isinstance(text, str)
    return text


def decode_id(text: str, what: str = "id") -> bytes:
    """Return the 16 bytes of a canonical id.

    Raises:
        InvalidId: see :func:`validate_id`.
    """
    validate_id(text, what)
    return base64.b32decode(text.upper() + "======")


def pid_for(ed25519_public: bytes) -> str:
    """The self-certifying participant id of an Ed25519 public key."""
    return encode_id(hashlib.sha256(ed25519_public).digest()[:ID_BYTES])


def cid_for(creator_pid: str, nonce: bytes) -> str:
    """The conversation id a creator claims with ``nonce`` (PROTOCOL.md §5.1)."""
    digest = hashlib.sha256(CID_LABEL + decode_id(creator_pid, "pid") + nonce).digest()
    return encode_id(digest[:ID_BYTES])
