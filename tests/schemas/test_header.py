"""The envelope header (PROTOCOL.md §3.2-§3.3): one layout, encoded, parsed and
sealed only by ``schemas.envelope``."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldchat.schemas import (
    CryptoError,
    Envelope,
    EnvelopeKind,
    LimitExceeded,
    WireError,
    encode_id,
)
from fieldchat.schemas.crypto import Signer, aead_open
from fieldchat.schemas.envelope import (
    FLAG_SIGNED,
    MAX_COVER,
    SIGNATURE_BYTES,
    TAG_BYTES,
    ChainHeaders,
    Header,
    coverage_digest,
    envelope_digest,
    header_bytes,
    read_header,
    seal_envelope,
    verify_envelope_signature,
    verify_signature,
)
from fieldchat.schemas.ids import decode_id

CID = encode_id(bytes(range(16, 32)))
CID_BYTES = decode_id(CID)
KEY, NONCE = bytes(range(32)), bytes(12)
SIGNER = Signer(bytes(32))
numbers = st.integers(min_value=0, max_value=(1 << 28) - 1)


@given(
    kind=st.sampled_from(EnvelopeKind),
    epoch=numbers,
    sender=numbers,
    chain=numbers,
    step=numbers,
    signed=st.booleans(),
    compressed=st.booleans(),
    padded=st.booleans(),
)
def test_header_round_trips_and_chain_headers_encode_the_same_bytes(
    kind, epoch, sender, chain, step, signed, compressed, padded
):
    flags = {"signed": signed, "compressed": compressed, "padded": padded}
    encoded = header_bytes(kind, epoch, sender, chain, step, **flags)
    body = encoded + bytes(TAG_BYTES) + (bytes(SIGNATURE_BYTES) if signed else b"")
    header = Header.parse(body)
    assert header == read_header(body)
    assert (header.kind, header.epoch, header.sender, header.chain, header.step) == (
        kind,
        epoch,
        sender,
        chain,
        step,
    )
    assert (header.signed, header.compressed, header.padded) == (signed, compressed, padded)
    assert header.size == len(encoded) and header.encode() == encoded
    assert header.chain_id == (epoch, sender, chain)
    assert header.dedupe_key == Envelope.from_bytes(body).dedupe_key
    assert ChainHeaders(epoch, sender, chain).encode(kind, step, **flags) == encoded


def test_chain_headers_cache_a_prefix_per_kind_byte():
    headers = ChainHeaders(1, 2, 0)
    for kind, signed, step in itertools.product(EnvelopeKind, (False, True), (0, 127, 128, 70_000)):
        for _ in range(2):  # the second time from the cached prefix
            got = headers.encode(kind, step, signed=signed, compressed=False, padded=False)
            assert got == header_bytes(kind, 1, 2, 0, step, signed=signed)


@pytest.mark.parametrize("signed", [False, True])
def test_sealed_envelope_opens_with_the_header_slices(signed):
    header_raw = header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 9, signed=signed)
    sign = SIGNER.sign if signed else None
    data = seal_envelope(header_raw, CID_BYTES, KEY, NONCE, b"plaintext", sign)
    header = Header.parse(data)
    ciphertext, aad = header.sealed(data, CID_BYTES)
    assert aad == header_raw + CID_BYTES
    assert aead_open(KEY, NONCE, ciphertext, aad) == b"plaintext"
    if signed:
        verify_signature(data, CID_BYTES, SIGNER.public)
        verify_envelope_signature(data, CID, SIGNER.public)
    else:
        assert not data[1] & FLAG_SIGNED
        with pytest.raises(CryptoError):
            verify_envelope_signature(data, CID, SIGNER.public)


def test_the_signature_covers_header_ciphertext_and_cid():
    header_raw = header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 9, signed=True)
    data = seal_envelope(header_raw, CID_BYTES, KEY, NONCE, b"plaintext", SIGNER.sign)
    end = len(data) - SIGNATURE_BYTES
    for position in (5, len(header_raw) + 1, end - 1):  # header, ciphertext, tag
        tampered = bytearray(data)
        tampered[position] ^= 1
        with pytest.raises(CryptoError):
            verify_signature(bytes(tampered), CID_BYTES, SIGNER.public)
    with pytest.raises(CryptoError):
        verify_signature(data, bytes(16), SIGNER.public)  # another conversation


def test_parse_refuses_what_cannot_hold_a_tag():
    with pytest.raises(WireError):
        Header.parse(header_bytes(EnvelopeKind.TEXT, 0, 0, 0, 0, signed=True) + bytes(TAG_BYTES))


def test_a_signed_header_carries_its_cover_and_only_a_signed_one():
    for cover in (0, 1, 127, 128, MAX_COVER):
        raw = header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 300, signed=True, cover=cover)
        body = raw + bytes(TAG_BYTES) + bytes(64)
        header = Header.parse(body)
        assert header.size == len(raw)
        assert header.cover(body) == cover
        assert header.encode(cover) == raw
        assert (
            ChainHeaders(0, 3, 0).encode(
                EnvelopeKind.TEXT, 300, signed=True, compressed=False, padded=False, cover=cover
            )
            == raw
        )
    unsigned = header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 300, signed=False)
    assert Header.parse(unsigned + bytes(TAG_BYTES)).cover(unsigned) == 0
    with pytest.raises(WireError):
        header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 300, signed=False, cover=1)
    with pytest.raises(LimitExceeded):
        header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 300, signed=True, cover=MAX_COVER + 1)
    too_many = header_bytes(EnvelopeKind.TEXT, 0, 3, 0, 1, signed=True) + bytes(TAG_BYTES + 64)
    with pytest.raises(LimitExceeded):  # 1024 as a cover
        Header.parse(too_many[:6] + b"\x80\x08" + too_many[7:])
    with pytest.raises(WireError):  # a non-minimal cover
        Header.parse(too_many[:6] + b"\x81\x00" + too_many[7:])


def test_coverage_digest_is_over_the_envelope_digests_in_order():
    a, b = envelope_digest(b"one"), envelope_digest(b"two")
    assert coverage_digest([]) == b""
    assert coverage_digest([a, b]) != coverage_digest([b, a])
    assert len(coverage_digest([a])) == 32
