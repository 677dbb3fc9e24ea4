"""One regression test per aMQTT 0.12.1 defect of issue 3.

Each runs against our broker, over MQTT 3.1.1 and over MQTT 5 (``ours-v5``: the
same test code, its peers speaking MQTT 5); with ``FIELDCHAT_STOCK_AMQTT=1`` each also
runs against stock aMQTT (tests/broker/_stock.py) where it must fail (strict xfail),
which shows the test detects the defect.
"""

from __future__ import annotations

import os
import socket
import time

import paho.mqtt.client as paho
import pytest

from fieldchat.broker import BrokerThread
from fieldchat.broker.testing import make_config
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL, ROSTER_X, X
from tests.broker._peers import Peer
from tests.broker._raw import RawClient, puback_packet, publish_packet, subscribe_packet
from tests.broker._stock import StockThread

T = Topics()
FLAVORS: list[object] = ["ours", "ours-v5"]
if os.environ.get("FIELDCHAT_STOCK_AMQTT") == "1":
    FLAVORS.append(
        pytest.param("stock", marks=pytest.mark.xfail(strict=True, reason="aMQTT 0.12.1 defect"))
    )


class World:
    def __init__(self, server, level: int = 4) -> None:
        self.server = server
        self.level = level
        self.port = server.port
        self.creds = {
            "alice": (ALICE.pid, server.enroll(ALICE.pid)),
            "bob": (BOB.pid, server.enroll(BOB.pid)),
            "carol": (CAROL.pid, server.enroll(CAROL.pid)),
            "gateway": server.add_gateway("test"),
        }
        self.peers: list[Peer] = []
        self.peer_protocol = paho.MQTTv5 if level == 5 else paho.MQTTv311

    def peer(self, who: str, **kw) -> Peer:
        protocol = paho.MQTTv5 if self.level == 5 else paho.MQTTv311
        peer = Peer(self.server.port, *self.creds[who], protocol=protocol, **kw)
        self.peers.append(peer)
        return peer

    def found_x(self) -> None:
        if isinstance(self.server, StockThread):  # stock cannot learn from rosters
            self.server.allow(ALICE.pid, X)
            self.server.allow(BOB.pid, X)
        alice = self.peer("alice")
        alice.connect()
        assert alice.publish(T.roster(X), ROSTER_X.to_bytes(), retain=True)
        alice.disconnect()


@pytest.fixture(params=FLAVORS)
def make_world(request, tmp_path):
    servers: list[BrokerThread | StockThread] = []

    def make(**limits):
        server: BrokerThread | StockThread
        if request.param == "stock":
            server = StockThread(max_connections=int(limits.get("max_connections", -1)))
        else:
            server = BrokerThread(make_config(tmp_path / f"b{len(servers)}", **limits))
        server.start()
        servers.append(server)
        world = World(server, 5 if request.param == "ours-v5" else 4)
        worlds.append(world)
        return world

    worlds: list[World] = []
    yield make
    for world in worlds:
        for peer in world.peers:
            peer.close()
    for server in servers:
        server.stop()


def test_retained_messages_are_not_replayed_to_non_members(make_world):
    w = make_world()
    w.found_x()
    bob = w.peer("bob")  # a member's subscription is what made stock replay to everyone
    bob.connect()
    assert bob.subscribe(T.roster(X)) != 128
    assert [m.payload for m in bob.expect(1)] == [ROSTER_X.to_bytes()]
    carol = w.peer("carol")
    carol.connect()
    assert carol.subscribe(T.inbox(CAROL.pid)) != 128
    assert [m.topic for m in carol.drain(1.0)] == []


def test_wrong_password_does_not_touch_the_session(make_world):
    w = make_world()
    w.found_x()
    bob = w.peer("bob", clean=False)
    bob.connect()
    assert bob.subscribe(T.msg(X)) != 128
    attacker = Peer(w.port, BOB.pid, "wrong password", clean=True, protocol=w.peer_protocol)
    w.peers.append(attacker)
    accepted, _, _ = attacker.connect(expect_ok=False)
    assert not accepted
    time.sleep(0.3)
    assert not bob.disconnected.is_set()  # the victim was not kicked
    alice = w.peer("alice")
    alice.connect()
    assert alice.publish(T.msg(X), b"still subscribed")
    assert [m.payload for m in bob.expect(1)] == [b"still subscribed"]


def test_takeover_closes_the_old_connection_and_the_new_one_receives(make_world):
    w = make_world()
    w.found_x()
    old = w.peer("bob", clean=False)
    old.connect()
    assert old.subscribe(T.msg(X)) != 128
    new = w.peer("bob", clean=False)
    _, _, present = new.connect()
    assert present
    assert old.disconnected.wait(5)
    alice = w.peer("alice")
    alice.connect()
    for i in range(5):
        assert alice.publish(T.msg(X), b"m%d" % i)
    assert sorted(m.payload for m in new.expect(5)) == [b"m%d" % i for i in range(5)]


def test_silent_client_is_dropped_after_keepalive_and_its_will_sent(make_world):
    w = make_world()
    watcher = w.peer("alice")
    watcher.connect()
    assert watcher.subscribe(T.status(BOB.pid)) != 128
    raw = RawClient(w.port, level=w.level)
    user, password = w.creds["bob"]
    will = (T.status(BOB.pid), b"\x00offline", 1, True)
    assert raw.login(user, user, password, keepalive=1, will=will) == b"\x00\x00"
    try:  # then silence: no PINGREQ
        got = watcher.expect(1, timeout=6)
        assert [m.payload for m in got] == [b"\x00offline"]
        assert raw.closed_by_peer(2)
    finally:
        raw.close()


def test_idle_sockets_are_closed_and_do_not_lock_out_clients(make_world):
    w = make_world(max_connections=3, connect_timeout_s=1.0)
    idle = [socket.create_connection(("127.0.0.1", w.port)) for _ in range(3)]
    try:
        for sock in idle:
            sock.settimeout(6)
            try:
                assert sock.recv(1) == b""  # the broker closed it: no CONNECT in time
            except TimeoutError:
                pytest.fail("an idle socket was never closed")
        alice = w.peer("alice")
        assert alice.connect(expect_ok=False)[0]
    finally:
        for sock in idle:
            sock.close()


def _persistent_subscriber(w, who="bob"):
    raw = RawClient(w.port, level=w.level)
    user, password = w.creds[who]
    raw.login(user, user, password, clean=False)
    raw.send(subscribe_packet(1, T.msg(X)))
    assert raw.read().type == 9
    return raw


def test_inflight_qos1_is_redelivered_on_reconnect(make_world):
    w = make_world()
    w.found_x()
    raw = _persistent_subscriber(w)
    alice = w.peer("alice")
    alice.connect()
    for i in range(5):
        assert alice.publish(T.msg(X), b"m%d" % i)
    first = [raw.read().publish for _ in range(5)]  # received, never acknowledged
    assert [p[2] for p in first] == [b"m%d" % i for i in range(5)]
    raw.close()
    raw = RawClient(w.port, level=w.level)
    try:
        user, password = w.creds["bob"]
        assert raw.login(user, user, password, clean=False) == b"\x01\x00"
        again = [raw.read().publish for _ in range(5)]
        assert [p[2] for p in again] == [b"m%d" % i for i in range(5)]
        assert all(p[3] for p in again)  # DUP set (MQTT-3.3.1-1)
        for p in again:
            assert p[1] is not None  # QoS 1: a packet id
            raw.send(puback_packet(p[1]))
    finally:
        raw.close()


@pytest.mark.slow
def test_inflight_qos1_survives_a_silent_subscriber_past_five_seconds(make_world):
    w = make_world()
    w.found_x()
    raw = _persistent_subscriber(w)
    alice = w.peer("alice")
    alice.connect()
    for i in range(5):
        assert alice.publish(T.msg(X), b"m%d" % i)
    assert len([raw.read() for _ in range(5)]) == 5
    time.sleep(6)  # stock aMQTT gives up on a PUBACK after 5 s and forgets the message
    raw.close()
    raw = RawClient(w.port, level=w.level)
    try:
        user, password = w.creds["bob"]
        raw.login(user, user, password, clean=False)
        assert [raw.read().publish[2] for _ in range(5)] == [b"m%d" % i for i in range(5)]
    finally:
        raw.close()


def test_queued_messages_keep_retain_0_and_qos0_is_not_upgraded(make_world):
    w = make_world()
    w.found_x()
    bob = w.peer("bob", clean=False)
    bob.connect()
    assert bob.subscribe(T.msg(X), qos=1) != 128
    alice = w.peer("alice")
    alice.connect()
    assert alice.publish(T.msg(X), b"live qos0", qos=0)
    [live] = bob.expect(1)
    assert (live.payload, live.qos) == (b"live qos0", 0)
    bob.disconnect()
    assert alice.publish(T.msg(X), b"queued")
    bob = w.peer("bob", clean=False)
    bob.connect()
    [queued] = bob.expect(1)
    assert (queued.payload, queued.retain, queued.qos) == (b"queued", False, 1)


def test_oversize_packet_closes_the_connection(make_world):
    w = make_world()
    w.found_x()
    bob = w.peer("bob")
    bob.connect()
    assert bob.subscribe(T.msg(X)) != 128
    raw = RawClient(w.port, level=w.level)
    try:
        user, password = w.creds["alice"]
        raw.login(user, user, password)
        try:
            raw.send(publish_packet(T.msg(X), b"\xff" * (1 << 20)))  # 1 MiB > 128 KiB
        except OSError:
            pass  # closed while we were still sending: that is the point
        assert raw.closed_by_peer(5)
    finally:
        raw.close()
    assert bob.drain(0.5) == []


def test_denied_publish_is_visible_to_the_client(make_world):
    w = make_world()
    carol = w.peer("carol")
    carol.connect()
    assert not carol.publish(T.bundle(ALICE.pid), b"forged")
    assert carol.disconnected.wait(5)


def test_anonymous_and_wildcard_everything_are_refused(make_world, request):
    # Stock aMQTT's *defaults* (AnonymousAuthPlugin, no topic plugin) fail this; the
    # stock harness is configured with a password and an ACL plugin, so it passes.
    if "stock" in request.node.callspec.id:
        pytest.skip("the stock harness is not stock defaults")
    w = make_world()
    anonymous = Peer(w.port, None, None, client_id="anon", protocol=w.peer_protocol)
    w.peers.append(anonymous)
    assert not anonymous.connect(expect_ok=False)[0]
    carol = w.peer("carol")
    carol.connect()
    assert carol.subscribe("#") == 128
    assert carol.subscribe("$SYS/#") == 128


def test_sessions_queues_and_binary_retained_survive_a_restart(make_world):
    w = make_world()
    w.found_x()
    bob = w.peer("bob", clean=False)
    bob.connect()
    assert bob.subscribe(T.msg(X)) != 128
    bob.disconnect()
    alice = w.peer("alice")
    alice.connect()
    payloads = [bytes([i, 0xFF, 0x80, 0x00]) + os.urandom(16) for i in range(50)]
    for payload in payloads:
        assert alice.publish(T.msg(X), payload)
    status = b"\x80\x81\xfe online"
    assert alice.publish(T.status(ALICE.pid), status, retain=True)
    alice.disconnect()
    w.server.restart()
    bob = w.peer("bob", clean=False)
    _, _, present = bob.connect()
    assert present
    assert [m.payload for m in bob.expect(50)] == payloads
    assert bob.subscribe(T.status(ALICE.pid)) != 128
    assert [m.payload for m in bob.expect(1)] == [status]
