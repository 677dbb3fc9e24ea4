"""The wire format: ids, topics, envelope, key-distribution objects and messages."""

from __future__ import annotations

import pytest

from fieldchat.schemas import (
    Bundle,
    Control,
    ControlOp,
    CryptoError,
    Envelope,
    EnvelopeKind,
    InvalidId,
    LimitExceeded,
    Receipt,
    ReceiptRange,
    ReceiptType,
    TextMessage,
    TopicKind,
    Topics,
    UnsupportedVersion,
    WireError,
    decode_plaintext,
    encode_id,
    encode_plaintext,
    validate_id,
)
from fieldchat.schemas._varint import decode as varint_decode
from fieldchat.schemas._varint import encode as varint_encode
from fieldchat.schemas.messages import MAX_PLAINTEXT_BYTES, padme_length

PID = encode_id(bytes(range(16)))
CID = encode_id(bytes(range(16, 32)))


def test_ids_are_canonical_base32():
    assert len(PID) == 26 and PID.lower() == PID
    assert validate_id(PID) == PID
    for bad in ("", PID.upper(), PID[:-1], PID + "a", PID[:-1] + "b", "0" * 26, None, 5):
        with pytest.raises(InvalidId):
            validate_id(bad)


def test_topics_build_and_parse():
    topics = Topics("site1/fc")
    assert topics.msg(CID) == f"site1/fc/c/{CID}/msg"
    parsed = topics.parse(topics.inbox(PID))
    assert parsed.kind is TopicKind.INBOX and parsed.pid == PID
    assert topics.parse(topics.roster(CID)).cid == CID
    for bad in (
        f"other/c/{CID}/msg",
        f"site1/fc/c/{CID}/inbox",
        f"site1/fc/p/{PID}/msg",
        "site1/fc/c/+/msg",
        f"site1/fc/c/{CID}/msg/extra",
        "site1/fc/c/#",
    ):
        with pytest.raises(InvalidId):
            topics.parse(bad)
    for prefix in ("", "a/#", "$SYS", "a//b", "a/+"):
        with pytest.raises(InvalidId):
            Topics(prefix)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2**21, 2**28 - 1])
def test_varints_round_trip(value):
    encoded = varint_encode(value)
    assert varint_decode(encoded, 0) == (value, len(encoded))


def test_varints_reject_non_minimal_and_out_of_range():
    with pytest.raises(WireError):
        varint_decode(b"\x80\x00", 0)
    with pytest.raises(WireError):
        varint_decode(b"\xff\xff\xff\xff\x01", 0)
    with pytest.raises(LimitExceeded):
        varint_encode(2**28)


def test_envelope_round_trip_and_version_first():
    env = Envelope(
        EnvelopeKind.TEXT,
        epoch=3,
        sender=2,
        chain=0,
        step=300,
        ciphertext=b"c" * 40,
        signature=b"s" * 64,
        compressed=True,
    )
    data = env.to_bytes()
    assert Envelope.from_bytes(data) == env
    assert len(data) == 1 + 1 + 1 + 1 + 1 + 2 + 1 + 40 + 64  # signed: a cover byte
    with pytest.raises(UnsupportedVersion):
        Envelope.from_bytes(b"\x02" + data[1:])
    with pytest.raises(UnsupportedVersion):  # checked before anything else, even length
        Envelope.from_bytes(b"\x99")
    for bad in (b"", data[:2], data[:7] + b"short", bytes([1, 9]) + data[2:]):
        with pytest.raises(WireError):
            Envelope.from_bytes(bad)
    with pytest.raises(LimitExceeded):
        Envelope.from_bytes(b"\x01" + b"\x01" * 70_000)


def test_bundle_rejects_a_bad_signature():
    from fieldchat.device.identity import Identity

    bundle = Identity.from_seed(b"\x01" * 32).bundle
    data = bytearray(bundle.to_bytes())
    assert Bundle.from_bytes(bytes(data)) == bundle
    data[10] ^= 1
    with pytest.raises((CryptoError, WireError)):
        Bundle.from_bytes(bytes(data))


@pytest.mark.parametrize(
    "message",
    [
        TextMessage(sent_at=1_700_000_000, text="héllo ✓"),
        TextMessage(sent_at=0, text=""),
        Receipt(
            type=ReceiptType.DELIVERED,
            ranges=(ReceiptRange(epoch=1, sender=2, chain=0, first=5, last=9),),
        ),
        Receipt(  # a gap request (PROTOCOL.md §4.1)
            type=ReceiptType.MISSING,
            ranges=(ReceiptRange(epoch=0, sender=1, chain=0, first=3, last=3),),
        ),
        Control(op=ControlOp.REKEY),
    ],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_plaintext_round_trip(message, compress, pad):
    from fieldchat.schemas.messages import kind_of

    data, compressed, padded = encode_plaintext(message, compress=compress, pad=pad)
    if pad:
        assert len(data) == padme_length(len(data))
    assert decode_plaintext(kind_of(message), data, compressed=compressed, padded=padded) == message


def test_text_framing_costs_eight_bytes():
    data, _, _ = encode_plaintext(TextMessage(sent_at=1_700_000_000, text="x" * 60))
    assert len(data) == 68


def test_decompression_bomb_is_refused():
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(b"\x00" * (MAX_PLAINTEXT_BYTES * 4)) + packer.flush()
    with pytest.raises(LimitExceeded):
        decode_plaintext(EnvelopeKind.TEXT, bomb, compressed=True)


def test_plaintext_of_the_wrong_shape_is_a_wire_error():
    from fieldchat.schemas._codec import pack

    for kind, value in (
        (EnvelopeKind.TEXT, (1,)),
        (EnvelopeKind.TEXT, ("1", "x")),
        (EnvelopeKind.TEXT, (True, "x")),
        (EnvelopeKind.RECEIPT, (3, ())),
        (EnvelopeKind.CONTROL, (9,)),
        (EnvelopeKind.TEXT, {"a": 1}),
    ):
        with pytest.raises(WireError):
            decode_plaintext(kind, pack(value))


def test_receipt_types_are_delivered_read_and_missing_only():
    """Type 3 is a gap request (PROTOCOL.md §4.1); any other type is a wire error."""
    from fieldchat.schemas._codec import pack

    ranges = ((0, 1, 0, 3, 4),)
    missing = decode_plaintext(EnvelopeKind.RECEIPT, pack((3, ranges)))
    assert isinstance(missing, Receipt) and missing.type is ReceiptType.MISSING
    for bad in (0, 4, True):
        with pytest.raises(WireError):
            decode_plaintext(EnvelopeKind.RECEIPT, pack((bad, ranges)))


def test_models_are_strict_and_frozen():
    import dataclasses

    from pydantic import ValidationError

    for bad in (
        {"sent_at": "1", "text": "x"},
        {"sent_at": True, "text": "x"},
        {"sent_at": -1, "text": "x"},
        {"sent_at": 1, "text": b"x"},
    ):
        with pytest.raises(WireError):
            TextMessage(**bad)
    with pytest.raises(LimitExceeded):
        TextMessage(sent_at=1, text="x" * 16_385)
    with pytest.raises(TypeError):
        TextMessage(sent_at=1, text="x", extra=1)  # type: ignore[call-arg]
    message = TextMessage(sent_at=1, text="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.text = "y"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Control(op=1, extra=2)  # type: ignore[call-arg, arg-type]
    control = Control(op=ControlOp.LEAVE)
    with pytest.raises(ValidationError):
        control.op = ControlOp.REKEY


def test_chain_grants_state_a_bounded_list_of_earlier_chain_ends():
    """PROTOCOL.md §5.3: ``ends`` is the 7th element, at most MAX_CHAIN_ENDS triples,
    each of an earlier epoch; the 6-element form is refused (one encoding)."""
    from fieldchat.schemas._codec import pack
    from fieldchat.schemas.grant import MAX_CHAIN_ENDS, ChainEnd, ChainGrant

    base = (5, bytes(32), 1, 0, 0, bytes(32))
    ends = ((4, 0, 17), (2, 0, 0))
    grant = ChainGrant.from_bytes(pack((*base, ends)))
    assert grant.ends == (
        ChainEnd(epoch=4, chain=0, next_step=17),
        ChainEnd(epoch=2, chain=0, next_step=0),
    )
    assert ChainGrant.from_bytes(grant.to_bytes()) == grant
    assert ChainGrant.from_bytes(pack((*base, ()))).ends == ()
    with pytest.raises(LimitExceeded):
        ChainGrant.from_bytes(pack((*base, tuple((e, 0, 1) for e in range(MAX_CHAIN_ENDS + 1)))))
    for bad in (
        base,  # no ends: the form before this rule
        (*base, ((5, 0, 1),)),  # an end of the grant's own epoch
        (*base, ((4, 0, 1), (4, 0, 2))),  # the same chain twice
        (*base, ((4, 0),)),  # not a triple
        (*base, ((4, 0, -1),)),
        (*base, [4, 0, 1]),
    ):
        with pytest.raises(WireError):
            ChainGrant.from_bytes(pack(bad))


def test_inbox_payloads_tell_rosters_from_grants_by_their_kind_byte():
    from fieldchat.schemas.roster import is_roster

    assert is_roster(b"\x01\x12rest") and not is_roster(b"\x01\x10rest")
    assert not is_roster(b"\x02\x12") and not is_roster(b"\x01") and not is_roster(b"")
