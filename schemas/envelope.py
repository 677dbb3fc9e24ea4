"""The conversation envelope: the bytes published on ``c/{cid}/msg`` (PROTOCOL.md §3).

    version u8 | kind u8 | epoch uv | sender uv | chain uv | step uv | ciphertext+tag | [sig 64]

``kind`` holds the message kind in its low five bits and flags in its high three
(signed, compressed, padded). ``sender`` is the member's index in the roster of
``epoch``, so the header names the sender in one byte instead of sixteen; the
roster maps it to the pid. The header bytes together with the 16-byte ``cid`` are
the AES-GCM associated data; a signature covers header, ciphertext and ``cid``.

This is a slotted frozen dataclass, not a pydantic model: it sits on the per-message
hot path where pydantic validation would cost more than the AES-GCM it wraps; its
decoder validates every field itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fieldchat.schemas import _varint
from fieldchat.schemas.crypto import ed25519_verify
from fieldchat.schemas.errors import CryptoError, LimitExceeded, UnsupportedVersion, WireError
from fieldchat.schemas.ids import decode_id

__all__ = [
    "FLAG_COMPRESSED",
    "FLAG_PADDED",
    "FLAG_SIGNED",
    "MAX_ENVELOPE_BYTES",
    "SIGNATURE_BYTES",
    "TAG_BYTES",
    "VERSION",
    "Envelope",
    "EnvelopeKind",
    "verify_envelope_signature",
]

VERSION = 0x01
TAG_BYTES = 16
SIGNATURE_BYTES = 64
MAX_ENVELOPE_BYTES = 65_536

FLAG_SIGNED = 0x80
FLAG_COMPRESSED = 0x40
FLAG_PADDED = 0x20
_KIND_MASK = 0x1F
_FLAGS_MASK = 0xE0


class EnvelopeKind(enum.IntEnum):
    """What the plaintext inside an envelope is (PROTOCOL.md §4)."""

    TEXT = 1
    RECEIPT = 2
    CONTROL = 3


_KINDS = {k.value: k for k in EnvelopeKind}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One sealed conversation message, exactly as it travels.

    ``chain_key`` (epoch, sender, chain, step) identifies it uniquely within a
    conversation: receivers and the archive deduplicate on it.
    """

    kind: EnvelopeKind
    epoch: int
    sender: int
    chain: int
    step: int
    ciphertext: bytes
    signature: bytes | None = None
    compressed: bool = False
    padded: bool = False

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def dedupe_key(self) -> tuple[int, int, int, int]:
        """``(epoch, sender, chain, step)``: unique per conversation."""
        return (self.epoch, self.sender, self.chain, self.step)

    def kind_byte(self) -> int:
        flags = (
            (FLAG_SIGNED if self.signature is not None else 0)
            | (FLAG_COMPRESSED if self.compressed else 0)
            | (FLAG_PADDED if self.padded else 0)
        )
        return flags | int(self.kind)

    def header(self) -> bytes:
        """The authenticated header (everything before the ciphertext).

        Raises:
            LimitExceeded: a number is out of the varint range.
        """
        return header_bytes(
            self.kind,
            self.epoch,
            self.sender,
            self.chain,
            self.step,
            signed=self.signature is not None,
            compressed=self.compressed,
            padded=self.padded,
        )

    def to_bytes(self) -> bytes:
        """Encode for the wire.

        Raises:
            LimitExceeded: a field is out of range or the result is too large.
            WireError: a signature of the wrong length or a ciphertext shorter than a tag.
        """
        if len(self.ciphertext) < TAG_BYTES:
            raise WireError("ciphertext shorter than the AES-GCM tag")
        sig = self.signature or b""
        if self.signature is not None and len(sig) != SIGNATURE_BYTES:
            raise WireError("signature must be 64 bytes")
        out = self.header() + self.ciphertext + sig
        if len(out) > MAX_ENVELOPE_BYTES:
            raise LimitExceeded(f"envelope of {len(out)} bytes exceeds {MAX_ENVELOPE_BYTES}")
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Decode wire bytes; the version byte is checked first.

        Raises:
            UnsupportedVersion: the first byte is not :data:`VERSION`.
            LimitExceeded: longer than :data:`MAX_ENVELOPE_BYTES`.
            WireError: anything else malformed.
        """
        return parse(data)[0]


def step_bytes(step: int) -> bytes:
    """The varint of a step; inline fast path for the one- and two-byte cases."""
    if step < 0x80:
        return bytes((step,))
    if step < 0x4000:
        return bytes(((step & 0x7F) | 0x80, step >> 7))
    return _varint.encode(step)


def header_bytes(
    kind: EnvelopeKind,
    epoch: int,
    sender: int,
    chain: int,
    step: int,
    *,
    signed: bool,
    compressed: bool = False,
    padded: bool = False,
) -> bytes:
    """Encode an envelope header without building an :class:`Envelope` (sealing path)."""
    flags = (
        (FLAG_SIGNED if signed else 0)
        | (FLAG_COMPRESSED if compressed else 0)
        | (FLAG_PADDED if padded else 0)
    )
    enc = _varint.encode
    return bytes((VERSION, flags | int(kind))) + enc(epoch) + enc(sender) + enc(chain) + enc(step)


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]  # IndexError is mapped by the caller
    if byte < 0x80:
        return byte, pos + 1
    second = data[pos + 1]
    if 0 < second < 0x80:  # two bytes: steps 128..16383
        return (byte & 0x7F) | (second << 7), pos + 2
    return _varint.decode(data, pos)


def read_header(data: bytes) -> tuple[EnvelopeKind, int, int, int, int, int, int]:
    """Decode the header only: ``(kind, flags, epoch, sender, chain, step, header_len)``.

    The opener's fast path: no :class:`Envelope` is built, and the header length
    lets it take the associated data as a slice of the received bytes.

    Raises:
        UnsupportedVersion, LimitExceeded, WireError: see :meth:`Envelope.from_bytes`.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError(f"envelope must be bytes, not {type(data).__name__}")
        data = bytes(data)
    size = len(data)
    if not size:
        raise WireError("empty envelope")
    if data[0] != VERSION:
        raise UnsupportedVersion(f"unsupported envelope version 0x{data[0]:02x}")
    if size > MAX_ENVELOPE_BYTES:
        raise LimitExceeded(f"envelope of {size} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        kind_byte = data[1]
        epoch, sender, chain, step = data[2], data[3], data[4], data[5]
        if epoch | sender | chain < 0x80 and step < 0x80:  # the usual one-byte header
            pos = 6
        else:
            epoch, pos = _varint_at(data, 2)
            sender, pos = _varint_at(data, pos)
            chain, pos = _varint_at(data, pos)
            step, pos = _varint_at(data, pos)
    except IndexError:
        raise WireError("truncated envelope header") from None
    kind = _KINDS.get(kind_byte & _KIND_MASK)
    if kind is None:
        raise WireError(f"unknown envelope kind {kind_byte & _KIND_MASK}")
    flags = kind_byte & _FLAGS_MASK
    sig_len = SIGNATURE_BYTES if flags & FLAG_SIGNED else 0
    if size - sig_len - pos < TAG_BYTES:
        raise WireError("envelope too short for its ciphertext")
    return kind, flags, epoch, sender, chain, step, pos


def parse(data: bytes) -> tuple[Envelope, int]:
    """Decode wire bytes; return the envelope and the header length.

    Raises:
        UnsupportedVersion, LimitExceeded, WireError: see :meth:`Envelope.from_bytes`.
    """
    kind, flags, epoch, sender, chain, step, pos = read_header(data)
    data = bytes(data)
    signed = bool(flags & FLAG_SIGNED)
    end = len(data) - (SIGNATURE_BYTES if signed else 0)
    envelope = Envelope(
        kind=kind,
        epoch=epoch,
        sender=sender,
        chain=chain,
        step=step,
        ciphertext=data[pos:end],
        signature=data[end:] if signed else None,
        compressed=bool(flags & FLAG_COMPRESSED),
        padded=bool(flags & FLAG_PADDED),
    )
    return envelope, pos


def verify_envelope_signature(data: bytes, cid: str, signer_key: bytes) -> None:
    """Check a signed envelope's Ed25519 signature without decrypting it.

    For the archive and the broker, which hold no conversation keys: the signature
    covers ``header || ciphertext || cid`` (PROTOCOL.md §3.3), so it proves who sent
    these exact bytes to this conversation.

    Raises:
        WireError, UnsupportedVersion, LimitExceeded: malformed envelope.
        CryptoError: unsigned, or the signature does not verify.
    """
    envelope, _ = parse(data)
    if envelope.signature is None:
        raise CryptoError("authentication failed")
    ed25519_verify(signer_key, envelope.signature, bytes(data[:-SIGNATURE_BYTES]) + decode_id(cid))
