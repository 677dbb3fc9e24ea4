"""Trace ids derived from envelopes, the OTEL_* switch, sampling, resends and garbage."""

from __future__ import annotations

import hashlib
import sys

import pytest

from fieldchat.schemas import tracing
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes
from fieldchat.schemas.errors import ConfigError
from fieldchat.schemas.ids import encode_id
from tests._otlp import OtlpReceiver

CID = encode_id(bytes(range(16)))


def envelope(sender: int, step: int, *, epoch: int = 0, chain: int = 0) -> bytes:
    header = header_bytes(EnvelopeKind.TEXT, epoch, sender, chain, step, signed=False)
    return header + b"\xaa" * 40  # ciphertext and tag: tracing never looks at them


def test_trace_ids_follow_the_documented_formula():
    fields = b"".join(v.to_bytes(4, "big") for v in (3, 1, 2, 700))
    h = hashlib.blake2b(
        bytes(range(16)) + fields, digest_size=24, person=b"fieldchat-trace1"
    ).digest()
    ids = tracing.trace_ids(CID, 3, 1, 2, 700)
    assert ids.trace_hex == h[:16].hex()
    assert ids.root_span_id == int.from_bytes(h[16:], "big")
    # pinned, so a change of formula is a deliberate change of docs/tracing.md
    assert ids.trace_hex == "a8088161d9541db894091bbb87e1b298"


def test_every_routing_field_and_the_key_change_the_trace():
    base = tracing.trace_ids(CID, 0, 0, 0, 0)
    others = [
        tracing.trace_ids(CID, 1, 0, 0, 0),
        tracing.trace_ids(CID, 0, 1, 0, 0),
        tracing.trace_ids(CID, 0, 0, 1, 0),
        tracing.trace_ids(CID, 0, 0, 0, 1),
        tracing.trace_ids(encode_id(bytes(16)), 0, 0, 0, 0),
        tracing.trace_ids(CID, 0, 0, 0, 0, key=b"k"),
    ]
    assert len({base.trace_id, *(o.trace_id for o in others)}) == 7
    assert tracing.trace_ids(CID, 0, 0, 0, 0) == base  # and nothing else does


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),  # off by default
        ({"OTEL_SERVICE_NAME": "x"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ("otlp", 1.0)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp", 1.0)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console", 1.0)),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "always_off"}, None),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
            },
            ("otlp", 0.25),
        ),
    ],
)
def test_standard_variables_switch_tracing(environ, expected):
    settings = tracing.TraceSettings.from_environ(environ)
    got = None if settings is None else (settings.exporter, settings.ratio)
    assert got == expected


def test_the_trace_flag_turns_it_on_and_the_key_stays_secret():
    settings = tracing.TraceSettings.from_environ({"FIELDCHAT_TRACE_KEY": "s3cret"}, force=True)
    assert settings is not None
    assert settings.exporter == "otlp"
    assert settings.key.get_secret_value() == b"s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp,console"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "jaeger_remote"},
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "2",
        },
        {"OTEL_TRACES_EXPORTER": "otlp", "FIELDCHAT_TRACE_KEY": "k" * 65},
    ],
)
def test_what_cannot_be_honoured_is_a_clear_error(environ):
    with pytest.raises(ConfigError):
        tracing.TraceSettings.from_environ(environ)


def test_without_the_extra_tracing_on_is_a_clear_error(monkeypatch):
    import fieldchat.schemas

    monkeypatch.delitem(sys.modules, "fieldchat.schemas._otel", raising=False)
    monkeypatch.delattr(fieldchat.schemas, "_otel", raising=False)  # as if never imported
    for name in [n for n in sys.modules if n.startswith("opentelemetry.sdk")] + [
        "opentelemetry.sdk"
    ]:
        monkeypatch.setitem(sys.modules, name, None)  # None: "not installed" to import
    with pytest.raises(ConfigError, match=r"fieldchat\[tracing\]"):
        tracing.Tracing(tracing.TraceSettings())


def test_off_means_no_tracer():
    tracing.configure(None)
    assert tracing.tracer("broker") is None
    tracing.shutdown()  # a no-op


@pytest.fixture
def otlp(monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        yield receiver


def pipeline(**settings) -> tracing.Tracing:
    return tracing.Tracing(tracing.TraceSettings(**settings))


def test_components_sample_the_same_envelopes(otlp):
    one, two = pipeline(ratio=0.5), pipeline(ratio=0.5)
    try:
        for step in range(200):
            data = envelope(1, step)
            one.tracer("device").publish(f"fc/v1/c/{CID}/msg", data)
            two.tracer("broker").span("route", CID, data)
        one.flush()
        two.flush()
    finally:
        one.shutdown()
        two.shutdown()
    spans = otlp.wait_for(lambda got: len(got) > 0)
    roots = {s.trace_id for s in spans if s.name == "publish"}
    routes = {s.trace_id for s in spans if s.name == "route"}
    assert roots == routes
    assert 60 < len(roots) < 140  # about half of 200


def test_a_resend_is_a_child_not_a_second_root(otlp):
    pipes = pipeline()
    device = pipes.tracer("device")
    try:
        device.publish(f"fc/v1/c/{CID}/msg", envelope(0, 5))
        device.publish(f"fc/v1/c/{CID}/msg", envelope(0, 5))
        pipes.flush()
    finally:
        pipes.shutdown()
    spans = otlp.wait_for(lambda got: len(got) == 2)
    root, again = sorted(spans, key=lambda s: s.parent_span_id)
    assert root.parent_span_id == ""
    assert again.parent_span_id == root.span_id
    assert again.attributes["fieldchat.resend"] is True
    assert root.span_id != again.span_id


def test_only_conversation_envelopes_are_traced_and_garbage_never_raises(otlp):
    pipes = pipeline()
    device, broker = pipes.tracer("device"), pipes.tracer("broker")
    try:
        device.publish(f"fc/v1/c/{CID}/roster", envelope(0, 1))  # not an envelope topic
        device.publish(f"fc/v1/p/{CID}/inbox", envelope(0, 1))
        device.publish(f"fc/v1/c/{CID}/msg", b"\x02garbage")  # unknown version
        device.publish("fc/v1/c/NOT-AN-ID/msg", envelope(0, 1))
        broker.span("route", CID, b"")
        broker.span("route", CID, envelope(0, 9), error="not_member")
        pipes.flush()
    finally:
        pipes.shutdown()
    (span,) = otlp.wait_for(lambda got: len(got) == 1)
    assert (span.name, span.error, span.attributes["fieldchat.step"]) == ("route", "not_member", 9)
