"""Delivery under failure, with devices in separate processes (``_peer.py``)."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldchat.device.client import Device
from fieldchat.device.engine import Engine
from fieldchat.device.state import DeviceState
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.frame import split
from tests.device.conftest import (
    Broker,
    Devices,
    Mosquitto,
    Peer,
    conversation,
    texts,
    wait_until,
)

pytestmark = pytest.mark.mosquitto


def _peers(devices: Devices, cid: str, made: list[Device]) -> list[Peer]:
    peers = []
    for device in made:
        peers.append(Peer(device.state.path, devices.broker, device.pid, cid))
    for device in made:
        devices.open.remove(device)
        device.close()
    return peers


class _Observer:
    """A raw paho subscriber (enrolled like anyone) recording what crosses the broker."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="observer")
        self.client.username_pw_set("observer", broker.user("observer"))
        self.client.on_message = lambda _c, _u, msg: self.messages.append(
            (msg.topic, bytes(msg.payload))
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    @property
    def envelopes(self) -> list[bytes]:
        """Every envelope seen, a frame's (PROTOCOL.md §3.4) one by one."""
        return [e for t, p in self.messages if t.endswith("/msg") for e in split(p)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_three_devices_chat_and_an_outsider_reads_nothing(devices: Devices) -> None:
    cid, made = conversation(devices, "alice", "bob", "carol")
    outsider = devices.make("dave")
    # The outsider subscribes wherever the broker lets it: the conversation's topics.
    outsider._worker.subscribe([outsider.topics.msg(cid), outsider.topics.roster(cid)])
    observer = None
    if isinstance(devices.broker, Mosquitto):
        observer = _Observer(devices.broker, f"{devices.broker_prefix}/#")
    peers = _peers(devices, cid, made)
    try:
        for peer in peers:
            peer.start(count=30, expect=60, batch=3, pace=0.01)
        results = [peer.wait() for peer in peers]
    finally:
        for peer in peers:
            peer.stop()
        if observer is not None:
            observer.close()
    for peer, lines in zip(peers, results, strict=True):
        by_sender = defaultdict(list)
        for line in lines:
            by_sender[line["sender"]].append(line["text"])
        others = [p for p in peers if p is not peer]
        # Exactly once each, in each sender's order.
        assert {s: by_sender[s] for s in by_sender} == {
            o.pid: [f"{o.pid[:6]}-{i:04d}" for i in range(30)] for o in others
        }
    assert outsider.messages() == []
    assert outsider.counters["received"] == 0
    if observer is not None:
        # Mosquitto (no ACL here) let an outsider see every envelope: none opens for it,
        # and no plaintext crosses the broker.
        envelopes = observer.envelopes
        assert len(envelopes) >= 90
        engine: Engine = outsider.engine
        for payload in envelopes:
            assert peers[0].pid[:6].encode() not in payload
            with pytest.raises(FieldchatError):
                engine.open(cid, payload)


def test_offline_device_gets_500_in_order_exactly_once(devices: Devices) -> None:
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    sender, receiver = _peers(devices, cid, [alice, bob])
    sender.start(send="m", count=500, batch=50)
    sender.wait()
    lines = receiver.start(expect=500).wait()
    assert [line["text"] for line in lines] == [f"m-{i:04d}" for i in range(500)]


@pytest.mark.slow
def test_sigkill_sender_1000_exactly_once_no_key_reuse(
    tmp_path: Path,
    mosquitto_devices: Devices,
) -> None:
    devices = mosquitto_devices
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    observer = _Observer(devices.broker, devices.broker_prefix + f"/c/{cid}/msg")
    sender, receiver = _peers(devices, cid, [alice, bob])
    rng = random.Random()
    receiver.start(expect=1000, duration=240)
    kills = 0
    try:
        for _ in range(5):
            sender.start(send="k", count=1000, batch=1)
            time.sleep(rng.uniform(0.3, 2.5))
            sender.kill()
            kills += 1
        sender.start(send="k", count=1000, batch=1, duration=200)
        sender.wait(220)
        lines = receiver.wait(240)
    finally:
        sender.stop()
        receiver.stop()
        observer.close()
    assert kills == 5
    got = [line["text"] for line in lines]
    if got != [f"k-{i:04d}" for i in range(1000)]:
        bad = next(i for i, t in enumerate(got) if t != f"k-{i:04d}")
        print([(line["text"], line["step"]) for line in lines[max(0, bad - 5) : bad + 8]])
    assert got == [f"k-{i:04d}" for i in range(1000)]
    # No (epoch, chain, step) ever carried two different ciphertexts: a key or nonce
    # is never used twice, however the sender died.
    seen: dict[tuple[int, int, int, int], set[bytes]] = defaultdict(set)
    for payload in observer.envelopes:
        _, _, epoch, index, chain, step, _ = read_header(payload)
        seen[(epoch, index, chain, step)].add(payload)
    assert seen and all(len(v) == 1 for v in seen.values())
    state = DeviceState(sender.state)
    try:
        assert len({s.text for s in state.sent(cid)}) == 1000
    finally:
        state.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "sigkill"])
def test_broker_restart_mid_run_loses_nothing(devices: Devices, how: str) -> None:
    if how == "sigkill" and not isinstance(devices.broker, Mosquitto):
        pytest.skip("the embedded broker runs in this process: it cannot be SIGKILLed alone")
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    sender, receiver = _peers(devices, cid, [alice, bob])
    receiver.start(expect=600, duration=150)
    # The sender stays until every message is receipted: a SIGKILLed Mosquitto forgets
    # what it acknowledged since its last snapshot, and only the sender can repair that.
    sender.start(send="r", count=600, batch=5, pace=0.04, duration=150, await_receipts=True)
    try:
        for _ in range(2):
            time.sleep(1.5)
            if how == "sigkill":
                devices.broker.kill()
            else:
                devices.broker.stop()
            devices.broker.start()
        sender.wait(170)
        lines = receiver.wait(170)
    finally:
        sender.stop()
        receiver.stop()
    assert [line["text"] for line in lines] == [f"r-{i:04d}" for i in range(600)]


def test_removed_member_cannot_read_later_messages(devices: Devices) -> None:
    cid, (alice, bob, carol) = conversation(devices, "alice", "bob", "carol")
    alice.send(cid, "before")
    wait_until(lambda: texts(carol, cid) == ["before"], 15, "carol reads before")
    alice.remove(cid, [carol.pid])
    if isinstance(devices.broker, Mosquitto):
        # Without an ACL the new roster reaches Carol too, and her device stops there;
        # the embedded broker no longer relays the conversation to her at all.
        wait_until(lambda: not carol.engine.is_member(cid), 15, "carol removed")
    wait_until(lambda: bob.engine.roster(cid).epoch == 1, 15, "bob in the new epoch")
    # Bob's chain of the new epoch reaches Alice before he speaks in it.
    wait_until(
        lambda: (
            (1, 1, 0) in alice.engine._convs[cid].recv
            or any(k[0] == 1 for k in alice.engine._convs[cid].recv)
        ),
        15,
        "bob's new grant",
    )
    alice.send(cid, "after, from alice")
    bob.send(cid, "after, from bob")
    wait_until(lambda: texts(bob, cid) == ["before", "after, from alice"], 15, "bob continues")
    wait_until(lambda: texts(alice, cid) == ["after, from bob"], 15, "alice continues")
    assert texts(carol, cid) == ["before"]
    # Even with the envelopes in hand, Carol's keys open none of them.
    later = [s for s in alice.sent(cid) if s.epoch == 1]
    payloads = alice.state._read("SELECT payload FROM sent WHERE epoch = 1")
    assert later and payloads
    for (payload,) in payloads:
        with pytest.raises(FieldchatError):
            carol.engine.open(cid, bytes(payload))


@pytest.mark.parametrize("outage_s", [3.0, pytest.param(30.0, marks=pytest.mark.slow)])
def test_outage_outbox_holds_then_drains_in_order(devices: Devices, outage_s: float) -> None:
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    alice.send_many(cid, [f"o-{i:03d}" for i in range(10)])
    wait_until(lambda: len(texts(bob, cid)) == 10, 15, "first ten")
    devices.broker.stop()
    wait_until(lambda: not alice.connected, 15, "the link notices")
    stop = time.monotonic() + outage_s
    sent = 10
    while time.monotonic() < stop and sent < 60:
        alice.send(cid, f"o-{sent:03d}")
        sent += 1
        time.sleep(outage_s / 60)
    assert len(alice.outbox()) >= sent - 10
    while time.monotonic() < stop:
        time.sleep(0.1)
    devices.broker.start()
    wait_until(lambda: len(texts(bob, cid)) == sent, 60, "the outbox drains")
    assert texts(bob, cid) == [f"o-{i:03d}" for i in range(sent)]
    assert alice.wait_drained(15)
