"""Traces end to end: a publisher's root span and the broker's ``route`` span, exported
over OTLP/HTTP from two processes to a loopback receiver, join one trace derived from
the envelope alone, and no span carries plaintext, ciphertext, keys or credentials."""

from __future__ import annotations

import os
import secrets
import socket
import time

import pytest

from fieldchat.broker import Store
from fieldchat.broker.testing import found_roster, participant
from fieldchat.schemas import tracing
from fieldchat.schemas.crypto import aead_seal
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.messages import TextMessage, encode_plaintext
from fieldchat.schemas.topics import Topics
from tests._otlp import OtlpReceiver, ReceivedSpan
from tests.broker._peers import Peer
from tests.broker._process import BrokerProcess

T = Topics()
ALICE, BOB, CAROL = participant(1), participant(2), participant(3)
ROSTER = found_roster(ALICE, [BOB])
X = ROSTER.cid
SECRET = "quokka-marmalade-7319"  # the plaintext; must appear in no span


def sealed_text(cid: str, sender: int, step: int, text: str) -> bytes:
    """A real envelope (PROTOCOL.md §3): AES-256-GCM under a throwaway key."""
    plaintext, _, _ = encode_plaintext(TextMessage(sent_at=1_700_000_000, text=text))
    header = header_bytes(EnvelopeKind.TEXT, 0, sender, 0, step, signed=False)
    key = secrets.token_bytes(32)
    return header + aead_seal(key, step.to_bytes(12, "big"), plaintext, header + decode_id(cid))


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FIELDCHAT_"))}
    return (
        env
        | {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not 5 s
        }
        | extra
    )


def leaks(spans: list[ReceivedSpan], secrets_: list[str]) -> list[tuple[str, str]]:
    return [(s.name, x) for s in spans for x in s.strings() for secret in secrets_ if secret in x]


@pytest.mark.parametrize("key", ["", "operators-trace-key"], ids=["unkeyed", "keyed"])
def test_publish_and_route_share_one_trace_without_leaking(tmp_path, monkeypatch, key):
    data = tmp_path / "broker"
    data.mkdir()
    with Store(data / "broker.sqlite3") as store:
        creds = {p.pid: store.enroll(p.pid) for p in (ALICE, BOB, CAROL)}
        gw_user, gw_credential = store.add_gateway("observer")
    with OtlpReceiver() as otlp:
        env = otel_env(otlp.endpoint, **({"FIELDCHAT_TRACE_KEY": key} if key else {}))
        broker = BrokerProcess(data, args=("--trace",), env=env)
        peers: list[Peer] = []
        publisher = None
        try:
            alice, bob, carol = (
                Peer(broker.port, p.pid, creds[p.pid]) for p in (ALICE, BOB, CAROL)
            )
            observer = Peer(broker.port, gw_user, gw_credential, clean=False)
            peers += [alice, bob, carol, observer]
            for peer in peers:
                peer.connect()
            assert alice.publish(T.roster(X), ROSTER.to_bytes(), retain=True)
            assert bob.subscribe(T.msg(X)) == 1
            assert observer.subscribe(T.all_msgs()) == 1

            # The publisher is a device here: its own tracing pipeline, same variables.
            for name, value in env.items():
                if name.startswith(("OTEL_", "FIELDCHAT_")):
                    monkeypatch.setenv(name, value)
            settings = tracing.TraceSettings.from_environ(os.environ)
            assert settings is not None
            publisher = tracing.Tracing(settings)
            device = publisher.tracer("device")
            envelope = sealed_text(X, 0, 7, SECRET)
            device.publish(T.msg(X), envelope)
            assert alice.publish(T.msg(X), envelope)
            assert bob.expect(1)[0].payload == envelope
            # carol is no member: acknowledged, dropped, and traced as a failed route
            intruder = sealed_text(X, 2, 3, SECRET)
            assert carol.publish(T.msg(X), intruder)
            publisher.flush()

            ids = tracing.trace_ids(X, 0, 0, 0, 7, key=key.encode())
            denied = tracing.trace_ids(X, 0, 2, 0, 3, key=key.encode())
            spans = otlp.wait_for(
                lambda got: (
                    {(s.trace_id, s.name) for s in got}
                    >= {
                        (ids.trace_hex, "publish"),
                        (ids.trace_hex, "route"),
                        (denied.trace_hex, "route"),
                    }
                )
            )
        finally:
            for peer in peers:
                peer.close()
            broker.terminate()
            if publisher is not None:
                publisher.shutdown()

    mine = [s for s in spans if s.trace_id == ids.trace_hex]
    (root,) = [s for s in mine if s.name == "publish"]
    (route,) = [s for s in mine if s.name == "route"]
    assert (root.service, root.kind, root.parent_span_id) == ("fieldchat-device", "producer", "")
    assert root.span_id == f"{ids.root_span_id:016x}"
    assert (route.service, route.scope, route.kind) == (
        "fieldchat-broker",
        "fieldchat.broker",
        "consumer",
    )
    assert route.parent_span_id == root.span_id
    assert route.error is None
    assert route.start_ns <= route.end_ns
    for span in (root, route):
        assert span.attributes["fieldchat.step"] == 7
        assert span.attributes["fieldchat.sender"] == 0
        assert span.attributes["fieldchat.kind"] == "text"
        assert span.attributes["messaging.message.body.size"] == len(envelope)
    assert route.attributes["fieldchat.broker.fanout"] == 2  # bob and the observer
    assert route.attributes["fieldchat.broker.persisted"] is True  # observer's session is durable

    (refused,) = [s for s in spans if s.trace_id == denied.trace_hex]
    assert refused.error == "not_member"
    assert refused.parent_span_id == f"{denied.root_span_id:016x}"

    if key:
        assert "fieldchat.cid" not in route.attributes
        assert (
            route.attributes["fieldchat.conversation"] == root.attributes["fieldchat.conversation"]
        )
        assert tracing.trace_ids(X, 0, 0, 0, 7).trace_hex != ids.trace_hex
    else:
        assert route.attributes["fieldchat.cid"] == X

    # Nothing a backend stores holds content, keys, credentials or pids.
    forbidden = [SECRET, envelope.hex(), intruder.hex(), gw_credential, *creds.values()]
    forbidden += [p.pid for p in (ALICE, BOB, CAROL)]
    if key:
        forbidden += [key, X]
    assert leaks(spans, forbidden) == []


@pytest.mark.parametrize(
    "off",
    [{"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}],
    ids=["none", "disabled"],
)
def test_tracing_switched_off_sends_nothing_even_with_an_endpoint(tmp_path, off):
    data = tmp_path / "broker"
    data.mkdir()
    with Store(data / "broker.sqlite3") as store:
        cred = store.enroll(ALICE.pid)
    with OtlpReceiver() as otlp:
        broker = BrokerProcess(data, env=otel_env(otlp.endpoint, **off))
        alice = Peer(broker.port, ALICE.pid, cred)
        try:
            alice.connect()
            assert alice.publish(T.roster(X), ROSTER.to_bytes(), retain=True)
            assert alice.publish(T.msg(X), sealed_text(X, 0, 1, SECRET))
            time.sleep(0.5)  # five export intervals
        finally:
            alice.close()
            assert broker.terminate() == 0
        assert otlp.requests == 0


def test_an_unreachable_collector_does_not_hold_up_a_stop(tmp_path):
    data = tmp_path / "broker"
    data.mkdir()
    with Store(data / "broker.sqlite3") as store:
        cred = store.enroll(ALICE.pid)
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    broker = BrokerProcess(data, env=otel_env(dead))
    alice = Peer(broker.port, ALICE.pid, cred)
    try:
        alice.connect()
        assert alice.publish(T.roster(X), ROSTER.to_bytes(), retain=True)
        assert alice.publish(T.msg(X), sealed_text(X, 0, 1, SECRET))  # not held up either
        time.sleep(0.5)  # the exporter is now retrying
    finally:
        alice.close()
        started = time.monotonic()
        assert broker.terminate() == 0
    assert time.monotonic() - started < tracing.STOP_TIMEOUT_S + 3
