"""Any bytes into any decoder: a typed FieldchatError or a valid object, never anything else.

At least 10,000 examples each (issue 2); the engine is fuzzed in tests/device/test_engine_fuzz.py.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldchat.schemas import Bundle, Envelope, FieldchatError, Grant, Roster, Topics
from fieldchat.schemas.envelope import EnvelopeKind
from fieldchat.schemas.messages import decode_plaintext

FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that look like ours often enough to get past the first checks.
wire_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda kind, rest: bytes([1, kind]) + rest, st.integers(0, 255), st.binary(max_size=300)
    ),
)


@FUZZ
@given(wire_bytes)
def test_envelope_from_bytes(data):
    try:
        envelope = Envelope.from_bytes(data)
    except FieldchatError:
        return
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope


@FUZZ
@given(wire_bytes)
def test_signed_objects_from_bytes(data):
    for cls in (Bundle, Roster, Grant):
        try:
            cls.from_bytes(data)
        except FieldchatError:
            pass


@FUZZ
@given(st.sampled_from(list(EnvelopeKind)), st.binary(max_size=200), st.booleans(), st.booleans())
def test_plaintext_decoder(kind, data, compressed, padded):
    try:
        decode_plaintext(kind, data, compressed=compressed, padded=padded)
    except FieldchatError:
        pass


@settings(max_examples=2_000, deadline=None)
@given(st.text(max_size=120))
def test_topic_parser(topic):
    try:
        Topics().parse(topic)
    except FieldchatError:
        pass
