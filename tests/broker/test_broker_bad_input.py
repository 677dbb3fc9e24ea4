"""Hostile and broken input: the broker drops the offender, keeps serving a canary
pub/sub pair throughout, and its memory returns to within 10% of where it started."""

from __future__ import annotations

import os
import socket
import time

import pytest

from fieldchat.broker import Store
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL
from tests.broker._peers import Peer
from tests.broker._process import BrokerProcess
from tests.broker._raw import RawClient, connect_packet, publish_packet, remaining

T = Topics()
CONFIG = "[limits]\nconnect_timeout_s = 1.0\nauth_failure_delay_s = 0.0\n"


class Canary:
    """bob publishes to alice's inbox; alice must get every message."""

    def __init__(self, port: int, creds: dict[str, str]) -> None:
        self.alice = Peer(port, ALICE.pid, creds[ALICE.pid])
        self.alice.connect()
        assert self.alice.subscribe(T.inbox(ALICE.pid)) == 1
        self.bob = Peer(port, BOB.pid, creds[BOB.pid])
        self.bob.connect()
        self.sent = 0

    def check(self, what: str) -> None:
        self.sent += 1
        payload = b"canary %d" % self.sent
        assert self.bob.publish(T.inbox(ALICE.pid), payload), f"canary publish failed {what}"
        got = [m.payload for m in self.alice.expect(1)]
        assert got == [payload], f"canary lost {what}"

    def close(self) -> None:
        self.alice.close()
        self.bob.close()


def _dropped(port: int, data: bytes) -> bool:
    raw = RawClient(port)
    try:
        try:
            raw.send(data)
        except OSError:
            return True
        return raw.closed_by_peer(5)
    finally:
        raw.close()


def _logged_in(port: int, creds: dict[str, str]) -> RawClient:
    raw = RawClient(port)  # carol: logging in as alice would take over the canary
    assert raw.login(CAROL.pid, CAROL.pid, creds[CAROL.pid]) == b"\x00\x00"
    return raw


def _attack(port: int, creds: dict[str, str], scale: int, canary: Canary) -> None:
    for _ in range(5 * scale):
        assert _dropped(port, os.urandom(4096))
    canary.check("after random bytes")
    connect = connect_packet(CAROL.pid, CAROL.pid, creds[CAROL.pid])
    assert _dropped(port, connect[:10])  # truncated, then silence
    canary.check("after a truncated packet")
    assert _dropped(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    canary.check("after an HTTP request")
    assert _dropped(port, b"\x10\xff\xff\xff\xff\x7f")  # five length bytes
    canary.check("after a bad remaining length")
    for topic in ("fc/v1/#", "fc/v1/p/+/inbox", "$SYS/x", ""):
        raw = _logged_in(port, creds)
        try:
            raw.send(publish_packet(topic, b"x"))
            assert raw.closed_by_peer(5), topic
        finally:
            raw.close()
    canary.check("after wildcard and $ topics in PUBLISH")
    raw = _logged_in(port, creds)
    try:
        body = b"\x00\x05fc/v1" + b"\x00\x01"
        try:
            raw.send(b"\x32" + remaining(10 << 20) + body + b"\x00" * 65536)
        except OSError:
            pass
        assert raw.closed_by_peer(5)
    finally:
        raw.close()
    canary.check("after an oversize payload")
    deadline = time.monotonic() + 60
    for _ in range(100 * scale):
        assert time.monotonic() < deadline, "rapid connects took too long"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(connect + b"\xe0\x00")  # CONNECT then DISCONNECT
    canary.check("after rapid connects and disconnects")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20 * scale)]
    try:
        canary.check("with idle sockets open")
        for sock in idle:
            sock.settimeout(10)
            assert sock.recv(1) == b"", "an idle socket was not closed"
    finally:
        for sock in idle:
            sock.close()
    canary.check("after idle sockets")


@pytest.mark.slow
def test_bad_input_is_dropped_and_memory_returns(tmp_path):
    data = tmp_path / "broker"
    with Store(data / "broker.sqlite3") as store:
        creds = {p.pid: store.enroll(p.pid) for p in (ALICE, BOB, CAROL)}
    broker = BrokerProcess(data, config=CONFIG)
    canary = Canary(broker.port, creds)
    try:
        _attack(broker.port, creds, 1, canary)  # warm-up: allocator arenas, caches
        time.sleep(1)
        start = broker.rss_kib()
        _attack(broker.port, creds, 10, canary)  # 1,000 connects, 200 idle sockets
        time.sleep(2)
        end = broker.rss_kib()
        assert broker.alive()
        assert end <= start * 1.10, f"RSS grew from {start} KiB to {end} KiB"
    finally:
        canary.close()
        assert broker.terminate() == 0
