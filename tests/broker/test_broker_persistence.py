"""Nothing acknowledged is lost: queues across SIGKILL, more than 65,535 queued
messages, and the bounded queue's counted overflow."""

from __future__ import annotations

import os
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldchat.broker import BrokerThread
from fieldchat.broker.testing import make_config
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, X, set_up_conversation
from tests.broker._peers import Peer
from tests.broker._process import BrokerProcess

T = Topics()


def _enroll(data_dir: Path) -> dict[str, str]:
    from fieldchat.broker import Store

    with Store(data_dir / "broker.sqlite3") as store:
        return {ALICE.pid: store.enroll(ALICE.pid), BOB.pid: store.enroll(BOB.pid)}


def _publish_many(port: int, creds, count: int) -> list[bytes]:
    """Publish ``count`` distinct binary QoS 1 messages; return them once all are PUBACKed."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ALICE.pid, protocol=mqtt.MQTTv311)
    client.username_pw_set(ALICE.pid, creds[ALICE.pid])
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        payloads = [i.to_bytes(4, "big") + b"\x00\xff\xfe" + os.urandom(8) for i in range(count)]
        deadline = time.monotonic() + 120
        for start in range(0, count, 10_000):  # paho tracks at most 65,535 message ids
            infos = [client.publish(T.msg(X), p, qos=1) for p in payloads[start : start + 10_000]]
            while not all(i.is_published() for i in infos):
                assert time.monotonic() < deadline, "publisher not acknowledged in time"
                time.sleep(0.02)
        return payloads
    finally:
        client.disconnect()
        client.loop_stop()


def _receive_all(port: int, creds, count: int, timeout: float = 120) -> list[bytes]:
    bob = Peer(port, BOB.pid, creds[BOB.pid], clean=False)
    try:
        _, _, present = bob.connect()
        assert present
        return [m.payload for m in bob.expect(count, timeout=timeout)] + [
            m.payload for m in bob.drain(0.5)
        ]
    finally:
        bob.disconnect()


@pytest.mark.slow
def test_no_queued_message_lost_across_sigkill(tmp_path):
    data = tmp_path / "broker"
    creds = _enroll(data)
    broker = BrokerProcess(data)
    try:
        set_up_conversation(broker.port, creds)
        sent = _publish_many(broker.port, creds, 1000)
    finally:
        broker.kill()  # right after the last PUBACK: no clean shutdown, no flush
    broker = BrokerProcess(data, broker.port)
    try:
        received = _receive_all(broker.port, creds, 1000)
    finally:
        assert broker.terminate() == 0
    lost = set(sent) - set(received)
    assert len(lost) == 0, f"{len(lost)} of 1000 acknowledged messages lost"
    assert received == sent  # and in order, none twice


@pytest.mark.slow
def test_more_than_65535_queued_messages_are_delivered(tmp_path):
    count = 66_000
    with BrokerThread(make_config(tmp_path / "broker")) as broker:
        creds = {ALICE.pid: broker.enroll(ALICE.pid), BOB.pid: broker.enroll(BOB.pid)}
        set_up_conversation(broker.port, creds)
        sent = _publish_many(broker.port, creds, count)
        received = _receive_all(broker.port, creds, count, timeout=180)
    assert len(received) == count
    assert received == sent


def test_queue_overflow_drops_oldest_and_counts(tmp_path, caplog):
    with BrokerThread(make_config(tmp_path / "broker", max_queued_messages=10)) as broker:
        creds = {ALICE.pid: broker.enroll(ALICE.pid), BOB.pid: broker.enroll(BOB.pid)}
        set_up_conversation(broker.port, creds)
        sent = _publish_many(broker.port, creds, 15)
        received = _receive_all(broker.port, creds, 10, timeout=10)
        drops = broker.broker.metrics.value("fieldchat_broker_queue_drops_total", reason="overflow")
    assert received == sent[5:]  # the newest ten; the five oldest dropped
    assert drops == 5
    assert any("dropped its oldest message" in r.getMessage() for r in caplog.records)
