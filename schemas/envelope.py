"""The conversation envelope: the bytes published on ``c/{cid}/msg`` (PROTOCOL.md §3).

    version u8 | kind u8 | epoch uv | sender uv | chain uv | step uv | [cover uv]
    | ciphertext+tag | [sig 64]

``kind`` holds the message kind in its low five bits and flags in its high three
(signed, compressed, padded). ``sender`` is the member's index in the roster of
``epoch``, so the header names the sender in one byte instead of sixteen; the
roster maps it to the pid. The header bytes together with the 16-byte ``cid`` are
the AES-GCM associated data; a signature covers header, ciphertext and ``cid``.
A signed envelope's header also says how many unsigned envelopes of its chain just
before it it covers (``cover``): their digest (:func:`coverage_digest`) joins its
associated data, so its tag checks them (delayed authentication, PROTOCOL.md §6.5).

This is a slotted frozen dataclass, not a pydantic model: it sits on the per-message
hot path where pydantic validation would cost more than the AES-GCM it wraps; its
decoder validates every field itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fieldchat.schemas import _varint
from fieldchat.schemas.crypto import aead_seal, ed25519_verify, sha256
from fieldchat.schemas.errors import CryptoError, LimitExceeded, UnsupportedVersion, WireError
from fieldchat.schemas.ids import decode_id

__all__ = [
    "FLAG_COMPRESSED",
    "FLAG_PADDED",
    "FLAG_SIGNED",
    "MAX_COVER",
    "MAX_ENVELOPE_BYTES",
    "SIGNATURE_BYTES",
    "TAG_BYTES",
    "VERSION",
    "ChainHeaders",
    "Envelope",
    "EnvelopeKind",
    "Header",
    "coverage_digest",
    "envelope_digest",
    "header_bytes",
    "read_header",
    "seal_envelope",
    "verify_envelope_signature",
    "verify_signature",
]

VERSION = 0x01
TAG_BYTES = 16
SIGNATURE_BYTES = 64
MAX_ENVELOPE_BYTES = 65_536
# A signed envelope covers at most the sign_every - 1 unsigned steps before it
# (schemas.roster.MAX_SIGN_EVERY = 1024), so a receiver keeps at most this many
# pending digests per chain (PROTOCOL.md §6.5, §8).
MAX_COVER = 1023
_COVERAGE_LABEL = b"fieldchat coverage v1"

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
    cover: int = 0  # signed only: the unsigned steps before this one it covers

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def dedupe_key(self) -> tuple[int, int, int, int]:
        """``(epoch, sender, chain, step)``: unique per conversation."""
        return (self.epoch, self.sender, self.chain, self.step)

    def kind_byte(self) -> int:
        return _kind_byte(
            int(self.kind),
            signed=self.signature is not None,
            compressed=self.compressed,
            padded=self.padded,
        )

    def header(self) -> bytes:
        """The authenticated header (everything before the ciphertext).

        Raises:
            LimitExceeded: a number is out of the varint range.
        """
        return _encode_header(
            self.kind_byte(), self.epoch, self.sender, self.chain, self.step, self.cover
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
        if self.cover and self.signature is None:
            raise WireError("only a signed envelope covers others")
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


def _kind_byte(kind: int, *, signed: bool, compressed: bool, padded: bool) -> int:
    return (
        kind
        | (FLAG_SIGNED if signed else 0)
        | (FLAG_COMPRESSED if compressed else 0)
        | (FLAG_PADDED if padded else 0)
    )


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
    cover: int = 0,
) -> bytes:
    """Encode an envelope header without building an :class:`Envelope` or a :class:`Header`.
    ``cover``: signed only, the unsigned steps just before this one it covers (§3.2).

    Raises:
        LimitExceeded: a number is out of the varint range, or ``cover`` above MAX_COVER.
    """
    kind_byte = _kind_byte(int(kind), signed=signed, compressed=compressed, padded=padded)
    return _encode_header(kind_byte, epoch, sender, chain, step, cover)


def _encode_header(
    kind_byte: int, epoch: int, sender: int, chain: int, step: int, cover: int = 0
) -> bytes:
    enc = _varint.encode
    out = bytes((VERSION, kind_byte)) + enc(epoch) + enc(sender) + enc(chain) + enc(step)
    if not kind_byte & FLAG_SIGNED:
        if cover:
            raise WireError("only a signed envelope covers others")
        return out
    if not 0 <= cover <= MAX_COVER:
        raise LimitExceeded(f"cover {cover} is above {MAX_COVER}")
    return out + enc(cover)


def envelope_digest(data: bytes) -> bytes:
    """SHA-256 of an envelope's bytes: what a later signed envelope covers (§6.5)."""
    return sha256(bytes(data))


def coverage_digest(digests: Sequence[bytes]) -> bytes:
    """The digest a signed envelope's associated data ends with when it covers the
    envelopes of ``digests`` (their :func:`envelope_digest`, in step order; §3.3):
    ``SHA-256("fieldchat coverage v1" || d_1 || … || d_n)``; empty for none."""
    if not digests:
        return b""
    return sha256(_COVERAGE_LABEL + b"".join(digests))


class Header(NamedTuple):
    """An envelope's header as parsed (PROTOCOL.md §3.2), with the byte ranges it implies.

    Fields in wire order, then ``size``, the header's length in the bytes it was read
    from (or encodes to): the associated data and the ciphertext are slices of those
    bytes, so the opener never copies or re-encodes the header. A named tuple rather
    than a frozen dataclass: one is built per received envelope (≈ 0.2 µs here, where a
    frozen dataclass costs a ``__setattr__`` a field), and code that indexes or unpacks
    the 7-tuple ``read_header`` used to return keeps working.
    ``flags`` is the high three bits of the kind byte (:data:`FLAG_SIGNED` and others).

    Only this module knows the layout: :meth:`encode`, :meth:`parse` (the version byte
    first), :meth:`sealed` (the associated data, §3.3) and, for signed envelopes,
    :func:`seal_envelope` and :func:`verify_signature` (what the signature covers).
    """

    kind: EnvelopeKind
    flags: int
    epoch: int
    sender: int  # the sender's index in the roster of ``epoch``
    chain: int
    step: int
    size: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """The header of an envelope (nothing after it is decoded, the lengths are checked).

        Raises:
            UnsupportedVersion, LimitExceeded, WireError: see :meth:`Envelope.from_bytes`.
        """
        return read_header(data)

    @property
    def signed(self) -> bool:
        return bool(self.flags & FLAG_SIGNED)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def padded(self) -> bool:
        return bool(self.flags & FLAG_PADDED)

    def cover(self, data: bytes) -> int:
        """How many unsigned steps just before this one a signed envelope covers (0 for
        an unsigned one), read from ``data``, the bytes this header was parsed from.

        The cover varint ends the header, and ``parse`` checked it; it is at most two
        bytes (MAX_COVER < 2^14) and the step before it ends with a byte below 0x80,
        so a high bit on the byte before the last says the cover took two bytes. Read
        on demand, so the tuple keeps its seven fields."""
        if not self[1] & FLAG_SIGNED:
            return 0
        end = self[6]
        if data[end - 2] & 0x80:
            return (data[end - 2] & 0x7F) | (data[end - 1] << 7)
        return data[end - 1]

    @property
    def chain_id(self) -> tuple[int, int, int]:
        """``(epoch, sender, chain)``: the sending chain, within its conversation."""
        return (self.epoch, self.sender, self.chain)

    @property
    def dedupe_key(self) -> tuple[int, int, int, int]:
        """``(epoch, sender, chain, step)``: unique per conversation (as
        :attr:`Envelope.dedupe_key`)."""
        return (self.epoch, self.sender, self.chain, self.step)

    def encode(self, cover: int = 0) -> bytes:
        """The header's bytes (what :meth:`parse` read, with ``cover``: see :meth:`cover`).

        Raises:
            LimitExceeded: a number is out of the varint range.
        """
        kind_byte = self.flags | int(self.kind)
        return _encode_header(kind_byte, self.epoch, self.sender, self.chain, self.step, cover)

    def sealed(self, data: bytes, cid_bytes: bytes) -> tuple[bytes, bytes]:
        """What AES-GCM opens in ``data``, the envelope this header was parsed from:
        ``(ciphertext and tag, associated data)``. The associated data is
        ``header || cid_bytes`` (§3.3), so the envelope cannot move to another
        conversation, sender, chain or step, nor change its flags. (One call for both:
        this is the per-message opening path.)"""
        size = self[6]  # self.size; indexing is the cheaper read
        if self[1] & FLAG_SIGNED:
            return data[size : len(data) - SIGNATURE_BYTES], data[:size] + cid_bytes
        return data[size:], data[:size] + cid_bytes


_new_header = tuple.__new__  # skips NamedTuple's Python-level __new__ on the opening path


class ChainHeaders:
    """Encodes the headers of one sending chain: the sealing path's encoder.

    ``epoch | sender | chain`` is the same for every envelope of a chain, so it is
    encoded once, and the ``version | kind byte`` prefix once per kind byte; sealing
    then appends the step. Equal bytes to :func:`header_bytes` (the vectors check it).

    Raises:
        LimitExceeded: a number is out of the varint range (on construction, or a
            step in :meth:`encode`).
    """

    __slots__ = ("_middle", "_prefixes")

    def __init__(self, epoch: int, sender: int, chain: int) -> None:
        enc = _varint.encode
        self._middle = enc(epoch) + enc(sender) + enc(chain)
        self._prefixes: dict[int, bytes] = {}

    def encode(
        self,
        kind: EnvelopeKind,
        step: int,
        *,
        signed: bool,
        compressed: bool,
        padded: bool,
        cover: int = 0,
    ) -> bytes:
        """The header of ``step`` of this chain (``cover``: signed only, §3.2)."""
        kind_byte = (  # as _kind_byte, inline: this is the per-message sealing path
            kind
            | (FLAG_SIGNED if signed else 0)
            | (FLAG_COMPRESSED if compressed else 0)
            | (FLAG_PADDED if padded else 0)
        )
        prefix = self._prefixes.get(kind_byte)
        if prefix is None:
            prefix = self._prefixes[kind_byte] = bytes((VERSION, kind_byte)) + self._middle
        out = prefix + (bytes((step,)) if step < 0x80 else step_bytes(step))
        if signed:
            if not 0 <= cover <= MAX_COVER:
                raise LimitExceeded(f"cover {cover} is above {MAX_COVER}")
            return out + (bytes((cover,)) if cover < 0x80 else step_bytes(cover))
        return out


def seal_envelope(
    header: bytes,
    cid_bytes: bytes,
    key: bytes,
    nonce: bytes,
    plaintext: bytes,
    sign: Callable[[bytes], bytes] | None = None,
    coverage: bytes = b"",
) -> bytes:
    """The envelope of ``plaintext`` under ``header`` (encoded): AES-GCM with the
    associated data ``header || cid_bytes || coverage``, then, with ``sign`` (the header
    must say SIGNED), the sender's Ed25519 signature over ``header || ciphertext ||
    cid_bytes`` (PROTOCOL.md §3.3). ``coverage``: signed only, the
    :func:`coverage_digest` of the unsigned envelopes its header's cover counts."""
    body = header + aead_seal(key, nonce, plaintext, header + cid_bytes + coverage)
    if sign is None:
        return body
    return body + sign(body + cid_bytes)


def verify_signature(data: bytes, cid_bytes: bytes, signer_key: bytes) -> None:
    """Check the signature of ``data``, a signed envelope already parsed (its header
    says SIGNED): Ed25519 over ``header || ciphertext || cid_bytes`` (§3.3).

    Raises:
        CryptoError: the signature does not verify (opaque).
    """
    end = len(data) - SIGNATURE_BYTES
    ed25519_verify(signer_key, data[end:], data[:end] + cid_bytes)


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]  # IndexError is mapped by the caller
    if byte < 0x80:
        return byte, pos + 1
    second = data[pos + 1]
    if 0 < second < 0x80:  # two bytes: steps 128..16383
        return (byte & 0x7F) | (second << 7), pos + 2
    return _varint.decode(data, pos)


def read_header(data: bytes) -> Header:
    """Decode the header only (:meth:`Header.parse`).

    The opener's fast path: no :class:`Envelope` is built, and the header's size
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
        if kind_byte & FLAG_SIGNED:
            cover, pos = _varint_at(data, pos)
            if cover > MAX_COVER:
                raise LimitExceeded(f"cover {cover} is above {MAX_COVER}")
    except IndexError:
        raise WireError("truncated envelope header") from None
    kind = _KINDS.get(kind_byte & _KIND_MASK)
    if kind is None:
        raise WireError(f"unknown envelope kind {kind_byte & _KIND_MASK}")
    flags = kind_byte & _FLAGS_MASK
    sig_len = SIGNATURE_BYTES if flags & FLAG_SIGNED else 0
    if size - sig_len - pos < TAG_BYTES:
        raise WireError("envelope too short for its ciphertext")
    return _new_header(Header, (kind, flags, epoch, sender, chain, step, pos))


def parse(data: bytes) -> tuple[Envelope, int]:
    """Decode wire bytes; return the envelope and the header length.

    Raises:
        UnsupportedVersion, LimitExceeded, WireError: see :meth:`Envelope.from_bytes`.
    """
    header = read_header(data)
    data = bytes(data)
    signed = header.signed
    end = len(data) - (SIGNATURE_BYTES if signed else 0)
    envelope = Envelope(
        kind=header.kind,
        epoch=header.epoch,
        sender=header.sender,
        chain=header.chain,
        step=header.step,
        ciphertext=data[header.size : end],
        signature=data[end:] if signed else None,
        compressed=header.compressed,
        padded=header.padded,
        cover=header.cover(data),
    )
    return envelope, header.size


def verify_envelope_signature(data: bytes, cid: str, signer_key: bytes) -> None:
    """Check a signed envelope's Ed25519 signature without decrypting it.

    For the archive and the broker, which hold no conversation keys: the signature
    covers ``header || ciphertext || cid`` (PROTOCOL.md §3.3), so it proves who sent
    these exact bytes to this conversation.

    Raises:
        WireError, UnsupportedVersion, LimitExceeded: malformed envelope.
        CryptoError: unsigned, or the signature does not verify.
    """
    if not read_header(data).signed:
        raise CryptoError("authentication failed")
    verify_signature(bytes(data), decode_id(cid), signer_key)
