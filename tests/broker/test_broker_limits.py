"""Issue 13, resource exhaustion: sockets that never log in, and a participant that
publishes faster than its quota (slowed by TCP pushback, nothing dropped).

Other loopback addresses (127.0.0.2 …) stand for other hosts: Linux routes all of
127.0.0.0/8 to the loopback interface.
"""

from __future__ import annotations

import socket
import time

from fieldchat.broker import BrokerThread
from fieldchat.broker.testing import make_config, participant
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB
from tests.broker._peers import Peer
from tests.broker._raw import RawClient, publish_packet

T = Topics()


def _idle(port: int, source: str, count: int) -> list[socket.socket]:
    return [
        socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        for _ in range(count)
    ]


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _served(broker: BrokerThread, credential: str, source: str) -> Peer:
    """ALICE, from ``source``, logs in and gets her own inbox message back."""
    peer = Peer(broker.port, ALICE.pid, credential, bind=source)
    try:
        assert peer.connect(expect_ok=False)[0], f"a client from {source} was locked out"
        assert peer.subscribe(T.inbox(ALICE.pid)) == 1
        assert peer.publish(T.inbox(ALICE.pid), b"served")
        assert [m.payload for m in peer.expect(1)] == [b"served"]
    finally:
        peer.close()
    return peer


def test_one_address_cannot_lock_out_another(tmp_path):
    # The attack: 1,030 idle sockets from one address filled the 1,024 connections.
    config = make_config(tmp_path / "b", max_connections=40, connect_timeout_s=1.0)
    with BrokerThread(config) as broker:
        credential = broker.enroll(ALICE.pid)
        idle = _idle(broker.port, "127.0.0.1", 40)
        try:
            start = time.monotonic()
            _served(broker, credential, "127.0.0.2")
            # 16 wait for their CONNECT until the timeout; the rest were closed at once
            assert all(_closed_within(sock, 5) for sock in idle), "an idle socket stayed open"
            assert time.monotonic() - start < 5
            metrics = broker.broker.metrics
            drops = "fieldchat_broker_dropped_connections_total"
            assert metrics.value(drops, reason="pending_per_address") == 24
            assert metrics.value(drops, reason="connect_timeout") == 16
        finally:
            for sock in idle:
                sock.close()


def test_a_flood_from_many_addresses_ages_out_its_own_sockets(tmp_path):
    config = make_config(tmp_path / "b", max_connections=16, connect_timeout_s=30.0)
    with BrokerThread(config) as broker:  # at most 8 may wait for their CONNECT
        credential = broker.enroll(ALICE.pid)
        online = []  # 8 logged-in clients: with the 8 pending ones, the broker is full
        for n in range(8):
            member = participant(40 + n)
            online.append(Peer(broker.port, member.pid, broker.enroll(member.pid)))
            online[-1].connect()
        idle = [s for i in range(8) for s in _idle(broker.port, f"127.0.0.{10 + i}", 2)]
        try:
            _served(broker, credential, "127.0.0.3")
            # the 9 oldest made room (for the newer ones and for alice), long before 30 s
            assert all(_closed_within(sock, 5) for sock in idle[:9])
            metrics = broker.broker.metrics
            drops = "fieldchat_broker_dropped_connections_total"
            assert metrics.value(drops, reason="pending_evicted") == 9
            assert metrics.value(drops, reason="max_connections") == 0
            assert not any(peer.disconnected.is_set() for peer in online)
        finally:
            for sock in idle:
                sock.close()
            for peer in online:
                peer.close()


def _flood(broker: BrokerThread, who: tuple[str, str], count: int, size: int) -> float:
    """``who`` sends ``count`` QoS 1 messages to bob's inbox at once (without waiting
    for PUBACKs); seconds until bob has them all, in order."""
    bob = Peer(broker.port, BOB.pid, broker.enroll(BOB.pid))
    try:
        bob.connect()
        assert bob.subscribe(T.inbox(BOB.pid)) == 1
        raw = RawClient(broker.port)
        try:
            assert raw.login(who[0], who[0], who[1]) == b"\x00\x00"
            start = time.monotonic()
            raw.send(
                b"".join(
                    publish_packet(
                        T.inbox(BOB.pid), i.to_bytes(4, "big") * (size // 4), 1, i % 65_535 + 1
                    )
                    for i in range(count)
                )
            )
            got = bob.expect(count, timeout=30)
            elapsed = time.monotonic() - start
        finally:
            raw.close()
    finally:
        bob.close()
    assert [m.payload[:4] for m in got] == [i.to_bytes(4, "big") for i in range(count)]
    return elapsed


def test_a_flood_is_slowed_not_dropped_and_gateways_are_exempt(tmp_path):
    config = make_config(tmp_path / "b", rate_messages_per_s=100, rate_messages_burst=20)
    with BrokerThread(config) as broker:
        metrics = broker.broker.metrics
        gateway = broker.add_gateway("relay")
        fast = _flood(broker, gateway, 150, 16)
        assert metrics.value("fieldchat_broker_throttled_total", limit="messages") == 0
        slow = _flood(broker, (ALICE.pid, broker.enroll(ALICE.pid)), 150, 16)
        assert slow >= (150 - 20) / 100 * 0.9  # every message, at the quota's pace
        assert fast < slow
        assert metrics.value("fieldchat_broker_throttled_total", limit="messages") > 0


def test_bytes_per_second_are_limited_too(tmp_path):
    config = make_config(tmp_path / "b", rate_bytes_per_s=50_000, rate_bytes_burst=10_000)
    with BrokerThread(config) as broker:
        elapsed = _flood(broker, (ALICE.pid, broker.enroll(ALICE.pid)), 30, 4000)
        assert elapsed >= (30 * 4000 - 10_000) / 50_000 * 0.9
        metrics = broker.broker.metrics
        assert metrics.value("fieldchat_broker_throttled_total", limit="bytes") > 0


def test_default_quota_does_not_slow_a_device_burst(tmp_path):
    with BrokerThread(make_config(tmp_path / "b")) as broker:
        # 2,000 publishes of 6 KiB (frames of 64 envelopes), at once: 12 MiB
        _flood(broker, (ALICE.pid, broker.enroll(ALICE.pid)), 2000, 6144)
        metrics = broker.broker.metrics
        assert metrics.value("fieldchat_broker_throttled_total", limit="messages") == 0
        assert metrics.value("fieldchat_broker_throttled_total", limit="bytes") == 0
