"""What a three-node NATS cluster enforces and relays for fieldchat (docs/cluster.md).

Raw MQTT 3.1.1 clients (paho) on different nodes: credentials, the fieldchat topic
rules as NATS permissions, retained messages and QoS 1 across nodes; then two real
devices on two nodes founding a conversation (the gateway retains its roster) and
chatting.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions, LinkOptions
from tests.cluster._nats import Cluster
from tests.device.conftest import wait_until
from tests.gateway._support import GatewayProcess

PREFIX = "fc/v1"
ALICE = "a" * 26
BOB = "b" * 26
CAROL = "c" * 26
FAST = LinkOptions(
    keepalive_s=10,
    connect_timeout_s=3.0,
    backoff_min_s=0.1,
    backoff_max_s=1.0,
    receipt_interval_s=0.2,
    resend_after_s=1.0,
)


class Raw:
    """A paho MQTT client on one node that records CONNACK, SUBACKs and messages."""

    def __init__(
        self,
        node_port: int,
        user: str | None,
        password: str | None,
        *,
        protocol: MQTTProtocolVersion = mqtt.MQTTv311,
        clean: bool = False,
    ) -> None:
        v311 = protocol == mqtt.MQTTv311
        client_id = user or "anonymous"
        if clean:  # a throwaway probe must not take over the user's own session
            client_id = f"{client_id}-probe-{secrets.token_hex(4)}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=clean if v311 else None,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        # No automatic reconnect during a test: a takeover must stay visible.
        self.client.reconnect_delay_set(min_delay=60, max_delay=120)
        self.connack: int | None = None
        self.session_present = False
        self.disconnects = 0
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.changed = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", node_port, 10)
        self.client.loop_start()

    def _on_connect(
        self, _c: object, _u: object, flags: mqtt.ConnectFlags, rc: object, _p: object
    ) -> None:
        with self.changed:
            self.connack = rc.value  # type: ignore[attr-defined]
            self.session_present = flags.session_present
            self.changed.notify_all()

    def _on_disconnect(self, *_args: object) -> None:
        with self.changed:
            self.disconnects += 1
            self.changed.notify_all()

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        with self.changed:
            self.subacks[mid] = [c.value for c in codes]
            self.changed.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.changed:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.changed.notify_all()

    def received(self) -> bool:
        return bool(self.messages)

    def answered(self) -> bool:
        return self.connack is not None

    def changed_wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        if not self.changed_wait(predicate, timeout):
            raise AssertionError(f"timed out waiting for {what}")

    def connected(self) -> Raw:
        self.wait(lambda: self.connack is not None, "CONNACK")
        assert self.connack == 0, self.connack
        return self

    def subscribe(self, topic: str, qos: int = 1) -> int:
        _, mid = self.client.subscribe(topic, qos=qos)
        assert mid is not None
        self.wait(lambda: mid in self.subacks, f"SUBACK for {topic}")
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw() -> Iterator[list[Raw]]:
    made: list[Raw] = []
    yield made
    for client in made:
        client.close()


def test_credentials_and_protocol_version(nats: Cluster, raw: list[Raw]) -> None:
    password = nats.device(ALICE)
    nats.start()
    port = nats.nodes[1].mqtt_port
    attempts = [
        Raw(port, None, None),  # anonymous
        Raw(port, ALICE, password + "x"),  # wrong credential
        Raw(port, ALICE, password, protocol=mqtt.MQTTv5),  # NATS speaks 3.1.1 only
    ]
    raw += attempts
    for client in attempts:
        client.wait(client.answered, "CONNACK")
    # paho reports 3.1.1 return codes 5 and 1 as 135 and 132 (MQTT 5 reason codes).
    assert [c.connack for c in attempts] == [135, 135, 132]
    raw.append(Raw(port, ALICE, password).connected())


def _alice_and_bob(nats: Cluster, raw: list[Raw], *others: str) -> tuple[Raw, Raw, list[str]]:
    """Start the cluster with alice, bob and ``others`` enrolled (before the start: a
    reload, SIGHUP, applies asynchronously); alice on node 1, bob on node 2, and the
    passwords of ``others``."""
    alice_pw, bob_pw = nats.device(ALICE), nats.device(BOB)
    passwords = [nats.device(pid) for pid in others]
    nats.start()
    alice = Raw(nats.nodes[0].mqtt_port, ALICE, alice_pw).connected()
    raw.append(alice)
    bob = Raw(nats.nodes[1].mqtt_port, BOB, bob_pw).connected()
    raw.append(bob)
    return alice, bob, passwords


def test_topic_rules_retained_and_qos1_across_nodes(nats: Cluster, raw: list[Raw]) -> None:
    alice, bob, (carol_pw,) = _alice_and_bob(nats, raw, CAROL)
    alice.publish(f"{PREFIX}/p/{ALICE}/bundle", b"alice-bundle-1", retain=True)
    wait_retained(nats, 1, f"{PREFIX}/p/{ALICE}/bundle", BOB)  # node 2 learnt it
    # Allowed: every bundle (retained, published on another node), conversations.
    assert bob.subscribe(f"{PREFIX}/p/+/bundle") == 1
    assert bob.subscribe(f"{PREFIX}/c/+/msg") == 1
    bob.wait(
        lambda: (f"{PREFIX}/p/{ALICE}/bundle", b"alice-bundle-1", True) in bob.messages,
        "the retained bundle from node 1",
    )
    # Refused (SUBACK 0x80): someone else's inbox, everything, NATS internals.
    for topic in (f"{PREFIX}/p/{ALICE}/inbox", "#", f"{PREFIX}/#", "$MQTT/sub/#"):
        assert bob.subscribe(topic) == 0x80, topic

    # A forged bundle for bob is acknowledged and dropped (as Mosquitto does), so a
    # device's outbox never stalls on it; it must not reach anyone.
    alice.publish(f"{PREFIX}/p/{BOB}/bundle", b"forged", retain=True)
    alice.publish(f"{PREFIX}/c/conv/msg", b"envelope-1")
    alice.publish(f"{PREFIX}/p/{ALICE}/bundle", b"alice-bundle-2", retain=True)
    bob.wait(
        lambda: (f"{PREFIX}/p/{ALICE}/bundle", b"alice-bundle-2", False) in bob.messages,
        "the second bundle",
    )
    bob.wait(
        lambda: (f"{PREFIX}/c/conv/msg", b"envelope-1", False) in bob.messages,
        "a QoS 1 message from node 1",
    )
    assert not [m for m in bob.messages if m[1] == b"forged"]

    # A late subscriber on the third node gets the newest retained bundle — once that
    # node has learnt it: NATS hands a retained message to the other nodes through a
    # stream, a moment later, so a SUBSCRIBE in between gets the one before (or none).
    # Subscribing again fetches the retained message again (MQTT §3.8.4), as devices do
    # for a roster they miss (device/roster_wait.py).
    late = Raw(nats.nodes[2].mqtt_port, CAROL, carol_pw).connected()
    raw.append(late)
    newest = (b"alice-bundle-2", True)
    for _ in range(10):
        assert late.subscribe(f"{PREFIX}/p/{ALICE}/bundle") == 1
        if late.changed_wait(lambda: bool(late.messages) and late.messages[-1][1:] == newest, 2):
            break
    assert late.messages[-1][1:] == newest, late.messages
    assert all(m[1:] in ((b"alice-bundle-1", True), newest) for m in late.messages)


def test_a_member_reads_a_concrete_status_and_no_one_forges_it(
    nats: Cluster, raw: list[Raw]
) -> None:
    # What a device following presence asks for (device/presence.py): one concrete
    # p/{pid}/status per member, on any node; only its owner writes it.
    alice, bob, _ = _alice_and_bob(nats, raw)
    alice.publish(f"{PREFIX}/p/{ALICE}/status", b"online", retain=True)
    wait_retained(nats, 1, f"{PREFIX}/p/{ALICE}/status", BOB)  # node 2 learnt it
    assert bob.subscribe(f"{PREFIX}/p/{ALICE}/status") == 1
    assert bob.subscribe(f"{PREFIX}/p/{BOB}/status") == 1
    bob.wait(
        lambda: (f"{PREFIX}/p/{ALICE}/status", b"online", True) in bob.messages,
        "alice's retained status on another node",
    )
    alice.publish(f"{PREFIX}/p/{BOB}/status", b"offline", retain=True)  # forged
    alice.publish(f"{PREFIX}/p/{ALICE}/status", b"offline", retain=True)
    bob.wait(
        lambda: (f"{PREFIX}/p/{ALICE}/status", b"offline", False) in bob.messages,
        "alice's next status",
    )
    assert not [m for m in bob.messages if m[0] == f"{PREFIX}/p/{BOB}/status"]


def test_only_gateways_write_rosters_participants_propose(nats: Cluster, raw: list[Raw]) -> None:
    # Issue 13: NATS cannot verify rosters, so a participant must not be able to
    # replace (or erase) the retained roster joiners trust; it proposes, and the
    # gateway, which verifies the chain, retains.
    alice_pw, bob_pw = nats.device(ALICE), nats.device(BOB)
    gw_pw = nats.gateway("gw-archive-1")
    nats.start()
    roster, proposal = f"{PREFIX}/c/conv/roster", f"{PREFIX}/c/conv/propose"
    gateway = Raw(nats.nodes[2].mqtt_port, "gw-archive-1", gw_pw).connected()
    raw.append(gateway)
    assert gateway.subscribe(f"{PREFIX}/c/+/propose") == 1
    gateway.publish(roster, b"epoch-0 by the verifier", retain=True)

    bob = Raw(nats.nodes[1].mqtt_port, BOB, bob_pw).connected()
    raw.append(bob)
    assert bob.subscribe(roster) == 1
    bob.wait(lambda: (roster, b"epoch-0 by the verifier", True) in bob.messages, "the roster")
    assert bob.subscribe(proposal) == 0x80  # proposals are for the verifier

    alice = Raw(nats.nodes[0].mqtt_port, ALICE, alice_pw).connected()
    raw.append(alice)
    alice.publish(roster, b"forged by a member", retain=True)  # acknowledged and dropped
    alice.publish(roster, b"", retain=True)  # an erasure, dropped too
    gateway.publish(roster, b"epoch-1 by the verifier", retain=True)
    bob.wait(lambda: (roster, b"epoch-1 by the verifier", False) in bob.messages, "epoch 1")
    assert [m for m in bob.messages if m[1] in (b"forged by a member", b"")] == []
    alice.publish(proposal, b"proposed by a member")
    gateway.wait(
        lambda: (proposal, b"proposed by a member", False) in gateway.messages,
        "the proposal at the gateway (another node)",
    )

    # A late subscriber on alice's node gets the verifier's roster, never the member's
    # (retained messages reach other nodes asynchronously: probe until epoch 1 shows).
    seen = []
    for _ in range(20):  # bounded: 20 probes of at most ~1.5 s
        late = Raw(nats.nodes[0].mqtt_port, BOB, bob_pw, clean=True).connected()
        try:
            assert late.subscribe(roster) == 1
            late.wait(late.received, "the retained roster on node 1")
            seen.append(late.messages[0][1])
        finally:
            late.close()
        if seen[-1] == b"epoch-1 by the verifier":
            break
    assert set(seen) <= {b"epoch-0 by the verifier", b"epoch-1 by the verifier"}
    assert seen[-1] == b"epoch-1 by the verifier"


def test_session_moves_between_nodes_and_takeover_closes_the_old_one(
    nats: Cluster, raw: list[Raw]
) -> None:
    alice_pw, bob_pw = nats.device(ALICE), nats.device(BOB)
    nats.start()
    alice = Raw(nats.nodes[0].mqtt_port, ALICE, alice_pw).connected()
    bob = Raw(nats.nodes[1].mqtt_port, BOB, bob_pw).connected()
    raw += [alice, bob]
    assert bob.subscribe(f"{PREFIX}/c/+/msg") == 1
    bob.close()  # clean DISCONNECT, clean session 0: the session and its queue stay
    _wait_unbound(nats)  # bob is offline for the whole cluster: what follows is queued
    for i in range(5):
        alice.publish(f"{PREFIX}/c/conv/msg", f"queued-{i}".encode())

    # The same client id on another node: session present, the queue delivered.
    moved = Raw(nats.nodes[2].mqtt_port, BOB, bob_pw).connected()
    raw.append(moved)
    assert moved.session_present
    moved.wait(lambda: len(moved.messages) >= 5, "the queued messages on node 3")
    assert sorted(m[1] for m in moved.messages) == [f"queued-{i}".encode() for i in range(5)]

    # And again on a third node while connected: the old connection is closed.
    again = _take_over(nats.nodes[0].mqtt_port, BOB, bob_pw, raw)
    moved.wait(lambda: moved.disconnects > 0, "the takeover to close the old connection")
    alice.publish(f"{PREFIX}/c/conv/msg", b"after-takeover")
    again.wait(
        lambda: (f"{PREFIX}/c/conv/msg", b"after-takeover", False) in again.messages,
        "delivery to the new connection",
    )


def _wait_unbound(cluster: Cluster) -> None:
    """Until no consumer of ``$MQTT_msgs`` has a subscriber: every node has seen the
    subscriber leave. Its node drops the subscription at once, but the consumer's
    leader (another node) learns that over a route a moment later; a message
    published in between is pushed to the node the subscriber left, dropped there,
    and redelivered only after ``ack_wait`` (30 s: seen once in 12 loaded runs, the
    first of five queued messages 29.5 s late, ``num_ack_pending`` 1)."""

    def unbound() -> bool:
        consumers = cluster.consumers() or []  # bob's subscription has one
        return bool(consumers) and not any(c.get("push_bound") for c in consumers)

    wait_until(unbound, 15, "the consumer's leader to see the subscriber leave")


def _take_over(port: int, user: str, password: str, raw: list[Raw], attempts: int = 3) -> Raw:
    """Connect with a client id another node holds the session of, as a device would:
    again if no CONNACK came. Once in a full-suite run (of many) the first CONNECT got
    no answer within 15 s while the other node still held the session; the next
    attempt is served. Each attempt waits 8 s, so a takeover that never works fails."""
    for _ in range(attempts):
        client = Raw(port, user, password)
        raw.append(client)
        if client.changed_wait(client.answered, 8.0):
            return client.connected()
        client.close()
    raise AssertionError(f"no CONNACK for the takeover in {attempts} attempts")


def _device(tmp: Path, name: str, cluster: Cluster, node: int) -> Device:
    path = tmp / f"{name}.sqlite3"
    probe = Device(path)
    pid = probe.pid
    probe.close()
    credential = cluster.device(pid)
    broker = BrokerOptions(
        host="127.0.0.1", port=cluster.nodes[node].mqtt_port, credential=SecretStr(credential)
    )  # protocol "auto"
    return Device(path, broker, link=FAST)


def test_devices_on_two_nodes_chat(nats: Cluster, tmp_path: Path) -> None:
    alice = _device(tmp_path, "alice", nats, 0)
    bob = _device(tmp_path, "bob", nats, 1)
    # NATS cannot verify rosters: the gateway (on node 3) is the one that retains them.
    gateway = GatewayProcess(
        tmp_path / "gateway",
        mqtt_url=nats.mqtt_url(2),
        mqtt_protocol="3.1.1",
        mqtt_username="gw-archive",
        mqtt_password=nats.gateway("gw-archive"),
        mqtt_client_id="gw-archive",
        topic_prefix=PREFIX,
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
    )
    nats.start()
    gateway.start()
    try:
        asyncio.run(gateway.healthy())
        for device in (alice, bob):
            device.start()
            device.wait_connected(20)
            assert device.protocol == "3.1.1"  # "auto" fell back from MQTT 5
        assert bob.wait_drained(20)
        wait_retained(nats, 0, f"{PREFIX}/p/{bob.pid}/bundle", alice.pid)
        cid = alice.create_conversation([bob.pid], timeout=20)
        assert bob.wait_for(lambda: bob.engine.is_member(cid), 20)
        alice.send_many(cid, [f"a{i}" for i in range(20)])
        bob.send_many(cid, [f"b{i}" for i in range(20)])
        assert bob.wait_for(lambda: len(bob.messages(cid)) >= 20, 30)
        assert alice.wait_for(lambda: len(alice.messages(cid)) >= 20, 30)
        assert alice.wait_for(lambda: alice.undelivered(cid) == 0, 30)  # bob's receipts
        assert [r.text for r in bob.messages(cid)] == [f"a{i}" for i in range(20)]
        assert [r.text for r in alice.messages(cid)] == [f"b{i}" for i in range(20)]
    finally:
        alice.close()
        bob.close()
        gateway.stop()


def wait_retained(cluster: Cluster, node: int, topic: str, user: str) -> None:
    """Until ``node`` replays the retained ``topic`` to a new subscriber.

    A barrier for first contact: a retained message published on another node
    reaches this node's retained set asynchronously, and a QoS 1 subscription is in
    place only once its JetStream consumer exists (docs/cluster.md, "Limits").
    """
    for _ in range(30):  # bounded: 30 probes of at most ~1.5 s
        probe = Raw(cluster.nodes[node].mqtt_port, user, cluster.users[user][0], clean=True)
        try:
            probe.connected()
            probe.subscribe(topic, qos=0)
            if probe.changed_wait(probe.received, 1.0):
                return
        finally:
            probe.close()
    raise AssertionError(f"{topic} never became visible on node {node + 1}")
