"""Plaintext message models and their encoding inside envelopes (PROTOCOL.md §4).

The envelope's kind says which model its plaintext holds, so the plaintext itself
is just the msgpack array of the model's fields: a 60-character text costs
1 (array) + 5 (time) + 2 (string header) bytes of framing.

Optional transforms, applied before encryption and flagged in the authenticated
header: raw DEFLATE compression (kept only when it saves bytes) and padding to
Padmé buckets (ISO/IEC 7816-4 marker ``0x80`` then zeros) so lengths leak less.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field, model_validator

from fieldchat.schemas import _codec
from fieldchat.schemas._codec import build, fields
from fieldchat.schemas._model import WireModel
from fieldchat.schemas.envelope import EnvelopeKind
from fieldchat.schemas.errors import LimitExceeded, WireError
from fieldchat.schemas.grant import MAX_CHAIN_ENDS, ChainEnd

__all__ = [
    "MAX_PLAINTEXT_BYTES",
    "MAX_RECEIPT_RANGES",
    "MAX_TEXT_BYTES",
    "MIN_PAD_BUCKET",
    "Control",
    "ControlOp",
    "Message",
    "Receipt",
    "ReceiptRange",
    "ReceiptType",
    "TextMessage",
    "decode_plaintext",
    "encode_plaintext",
    "padme_length",
]

MAX_TEXT_BYTES = 16_384
MAX_PLAINTEXT_BYTES = 32_768
MAX_RECEIPT_RANGES = 256
MIN_PAD_BUCKET = 32
_U28 = Annotated[int, Field(ge=0, lt=2**28)]


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A chat message. ``sent_at`` is the sender's clock in Unix seconds.

    A frozen, slotted dataclass checked in ``__post_init__`` rather than a pydantic
    model, like :class:`~schemas.Envelope`: one is built per message received, and
    pydantic validation cost more than the AES-GCM that protects it.

    Raises:
        WireError: ``sent_at`` is not an int in [0, 2^40) or ``text`` is not a str.
        LimitExceeded: ``text`` is longer than MAX_TEXT_BYTES characters.
    """

    sent_at: int
    text: str

    def __post_init__(self) -> None:
        sent_at, text = self.sent_at, self.text
        if type(sent_at) is not int or not 0 <= sent_at < 2**40:
            raise WireError("text message sent_at must be an int in [0, 2^40)")
        if type(text) is not str:
            raise WireError("text message text must be a str")
        if len(text) > MAX_TEXT_BYTES:
            raise LimitExceeded(f"text longer than {MAX_TEXT_BYTES} characters")


class ReceiptType(enum.IntEnum):
    """What a receipt's ranges say (PROTOCOL.md §4.1).

    ``MISSING`` is a gap request, not an acknowledgement: the ranges are steps the
    receiver lacks and holds later envelopes for; the sender publishes them again.
    """

    DELIVERED = 1
    READ = 2
    MISSING = 3


class ReceiptRange(WireModel):
    """Steps ``first..last`` (inclusive) of one sender chain."""

    epoch: _U28
    sender: _U28
    chain: _U28
    first: _U28
    last: _U28


class Receipt(WireModel):
    """Delivery or read receipts, batched as step ranges per sender chain."""

    type: ReceiptType
    ranges: Annotated[tuple[ReceiptRange, ...], Field(min_length=1, max_length=MAX_RECEIPT_RANGES)]


class ControlOp(enum.IntEnum):
    LEAVE = 1  # the sender leaves; an admin publishes the next roster without it
    REKEY = 2  # the sender asks an admin for a new epoch (e.g. after restoring state)
    ENDS = 3  # where the sender's chains of earlier epochs ended (PROTOCOL.md §6.5)
    UPDATE = 4  # the sender rotated its prekey: a new epoch, delivered to it (§6.7)
    JOINED = 5  # a new member keyed its first epoch: it listens now (§6.6)

    @property
    def signed_only(self) -> bool:
        """Sealed signed whatever the policy, and acted on only when signed (§6.5):
        unsigned, any member could have sealed it in the sender's name, and each of
        these makes an admin change the roster or issue an epoch, or a receiver accept
        a chain end. JOINED is not: what it triggers (resends) is bounded per epoch."""
        return self is not ControlOp.JOINED


class Control(WireModel):
    """``msgpack[op]``; ENDS: ``msgpack[3, [[epoch, chain, next_step], …]]``;
    UPDATE: ``msgpack[4, prekey_id, prekey_digest]``."""

    op: ControlOp
    ends: Annotated[tuple[ChainEnd, ...], Field(max_length=MAX_CHAIN_ENDS)] = ()
    prekey_id: _U28 = 0
    prekey_digest: bytes = b""

    @model_validator(mode="after")
    def _check_op(self) -> Control:
        if self.op is not ControlOp.ENDS and self.ends:
            raise ValueError("only an ENDS control states chain ends")
        if len({(end.epoch, end.chain) for end in self.ends}) != len(self.ends):
            raise ValueError("a chain end is stated twice")
        if self.op is ControlOp.UPDATE:
            if self.prekey_id < 1 or len(self.prekey_digest) != 32:
                raise ValueError("an UPDATE names a prekey id and its 32-byte digest")
        elif self.prekey_id or self.prekey_digest:
            raise ValueError("only an UPDATE names a prekey")
        return self


Message = TextMessage | Receipt | Control
_RECEIPT_TYPES = frozenset(int(t) for t in ReceiptType)
_KIND_OF: dict[type, EnvelopeKind] = {
    TextMessage: EnvelopeKind.TEXT,
    Receipt: EnvelopeKind.RECEIPT,
    Control: EnvelopeKind.CONTROL,
}


def kind_of(message: Message) -> EnvelopeKind:
    return _KIND_OF[type(message)]


def _pack(message: Message) -> bytes:
    if isinstance(message, TextMessage):
        return _codec.pack((message.sent_at, message.text))
    if isinstance(message, Receipt):
        return _codec.pack(
            (
                int(message.type),
                tuple((r.epoch, r.sender, r.chain, r.first, r.last) for r in message.ranges),
            )
        )
    if message.op is ControlOp.ENDS:
        ends = tuple((e.epoch, e.chain, e.next_step) for e in message.ends)
        return _codec.pack((int(message.op), ends))
    if message.op is ControlOp.UPDATE:
        return _codec.pack((int(message.op), message.prekey_id, message.prekey_digest))
    return _codec.pack((int(message.op),))


def padme_length(length: int) -> int:
    """Padmé bucket for ``length`` (Nikitin et al., PETS 2019): ≤ 12 % overhead."""
    if length <= MIN_PAD_BUCKET:
        return MIN_PAD_BUCKET
    exp = length.bit_length() - 1
    low_bits = exp - exp.bit_length()
    mask = (1 << low_bits) - 1
    return (length + mask) & ~mask


def encode_plaintext(
    message: Message, *, compress: bool = False, pad: bool = False
) -> tuple[bytes, bool, bool]:
    """Return ``(plaintext, compressed, padded)`` for sealing.

    Raises:
        LimitExceeded: the encoded message is larger than MAX_PLAINTEXT_BYTES.
    """
    if type(message) is TextMessage and not (compress or pad):  # the per-message path
        data = _codec.pack((message.sent_at, message.text))
        if len(data) > MAX_PLAINTEXT_BYTES:
            raise LimitExceeded(f"plaintext of {len(data)} bytes exceeds {MAX_PLAINTEXT_BYTES}")
        return data, False, False
    data = _pack(message)
    compressed = False
    if compress:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        squeezed = packer.compress(data) + packer.flush()
        if len(squeezed) < len(data):
            data, compressed = squeezed, True
    if pad:
        target = padme_length(len(data) + 1)
        data = data + b"\x80" + bytes(target - len(data) - 1)
    if len(data) > MAX_PLAINTEXT_BYTES:
        raise LimitExceeded(f"plaintext of {len(data)} bytes exceeds {MAX_PLAINTEXT_BYTES}")
    return data, compressed, pad


def _unpad(data: bytes) -> bytes:
    end = data.rstrip(b"\x00")
    if not end or end[-1] != 0x80:
        raise WireError("bad padding")
    return end[:-1]


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj(-15)
    try:
        out = inflater.decompress(data, MAX_PLAINTEXT_BYTES + 1)
    except zlib.error:
        raise WireError("bad compressed plaintext") from None
    if len(out) > MAX_PLAINTEXT_BYTES or inflater.unconsumed_tail:
        raise LimitExceeded("compressed plaintext expands beyond the limit")
    if not inflater.eof or inflater.unused_data:
        raise WireError("bad compressed plaintext")
    return out


def _decode_text(data: bytes) -> TextMessage:
    value = _codec.unpack(data, "text message")
    if type(value) is not tuple or len(value) != 2:
        raise WireError("text message must be an array of 2 items")
    return TextMessage(*value)


def decode_plaintext(
    kind: EnvelopeKind, data: bytes, *, compressed: bool = False, padded: bool = False
) -> Message:
    """Inverse of :func:`encode_plaintext` (the caller has authenticated ``data``).

    Raises:
        WireError: not the model the kind announces.
        LimitExceeded: a decompression bomb.
    """
    if kind is EnvelopeKind.TEXT and not (padded or compressed):
        return _decode_text(data)  # the per-message path
    if padded:
        data = _unpad(data)
    if compressed:
        data = _inflate(data)
    value = _codec.unpack(data, "plaintext")
    if kind is EnvelopeKind.TEXT:
        sent_at, text = fields(value, 2, "text message")
        return TextMessage(sent_at, text)
    if kind is EnvelopeKind.RECEIPT:
        rtype, raw_ranges = fields(value, 2, "receipt")
        if not isinstance(raw_ranges, tuple) or len(raw_ranges) > MAX_RECEIPT_RANGES:
            raise WireError("receipt ranges must be an array")
        if rtype not in _RECEIPT_TYPES or isinstance(rtype, bool):
            raise WireError("unknown receipt type")
        ranges = []
        for raw in raw_ranges:
            epoch, sender, chain, first, last = fields(raw, 5, "receipt range")
            ranges.append(
                build(
                    ReceiptRange,
                    "receipt range",
                    epoch=epoch,
                    sender=sender,
                    chain=chain,
                    first=first,
                    last=last,
                )
            )
        return build(Receipt, "receipt", type=ReceiptType(rtype), ranges=tuple(ranges))
    return _decode_control(value)


def _decode_control(value: object) -> Control:
    if not isinstance(value, tuple) or not value:
        raise WireError("control must be a non-empty array")
    op = value[0]
    if op not in (1, 2, 3, 4, 5) or isinstance(op, bool):
        raise WireError("unknown control op")
    if op == ControlOp.ENDS:
        _, raw_ends = fields(value, 2, "ends control")
        if not isinstance(raw_ends, tuple):
            raise WireError("chain ends must be an array")
        if len(raw_ends) > MAX_CHAIN_ENDS:
            raise LimitExceeded(f"an ENDS control states at most {MAX_CHAIN_ENDS} chain ends")
        ends = []
        for raw in raw_ends:
            epoch, chain, next_step = fields(raw, 3, "chain end")
            ends.append(build(ChainEnd, "chain end", epoch=epoch, chain=chain, next_step=next_step))
        return build(Control, "control", op=ControlOp.ENDS, ends=tuple(ends))
    if op == ControlOp.UPDATE:
        _, prekey_id, digest = fields(value, 3, "update control")
        return build(
            Control, "control", op=ControlOp.UPDATE, prekey_id=prekey_id, prekey_digest=digest
        )
    fields(value, 1, "control")
    return Control(op=ControlOp(op))
