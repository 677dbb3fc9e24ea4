"""The device's side of issue 13 (items 2, 4, 5) on a real Mosquitto.

Rosters are proposed on ``c/{cid}/propose`` and retained by the verifier
(``tests.device._verifier``, the gateway's part on Mosquitto); a device adopts them
only through a chain from epoch 0, fetching missing ones from the gateway. A member
removed from a low-bandwidth conversation cannot make its former peers show unsigned
old-epoch messages in a remaining member's name. An unsigned sender far ahead is
reached without a receiver deriving more than MAX_UNSIGNED_JUMP steps per envelope.
"""

from __future__ import annotations

import os
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldchat.device.chains import step_keys
from fieldchat.device.client import Device
from fieldchat.device.history import GatewayHistory
from fieldchat.schemas import Policy, TextMessage, Topics
from fieldchat.schemas.crypto import aead_seal
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.messages import encode_plaintext
from tests.device.conftest import (
    FAST,
    STACK_QUEUE,
    Broker,
    Devices,
    texts,
    wait_until,
)

pytestmark = pytest.mark.mosquitto


def members(devices: Devices, policy: Policy, *names: str) -> tuple[str, list[Device]]:
    made = [devices.make(name) for name in names]
    cid = made[0].create_conversation([d.pid for d in made[1:]], policy=policy)
    wait_until(
        lambda: (
            all(
                len(d.engine._convs[cid].recv) == len(made) - 1
                for d in made
                if d.engine.is_member(cid)
            )
            and all(d.engine.is_member(cid) for d in made)
        ),
        15,
        "everyone holds everyone's chain",
    )
    return cid, made


def publish(broker: Broker, topic: str, payload: bytes) -> None:
    """Publish as a raw MQTT client: what a removed member's own program can do."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{os.urandom(4).hex()}")
    client.username_pw_set("raw", broker.user("raw"))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_a_removed_member_cannot_show_old_unsigned_messages_as_a_remaining_one(
    mosquitto_devices: Devices,
) -> None:
    devices = mosquitto_devices
    cid, (alice, bob, carol) = members(devices, Policy(sign_every=0), "alice", "bob", "carol")
    alice.send(cid, "a0")
    wait_until(lambda: texts(bob, cid) == texts(carol, cid) == ["a0"], 10, "a0 everywhere")
    index = alice.engine.roster(cid).index_of(alice.pid)
    kept = carol.engine._convs[cid].recv[(0, index, 0)]  # Carol's copy of Alice's chain
    step, ck = kept.step + 40, kept.key  # past anything Alice sealed (texts, receipts)
    for _ in range(40):
        ck = step_keys(ck)[1]

    alice.remove(cid, [carol.pid])
    wait_until(lambda: (1, index, 0) in bob.engine._convs[cid].recv, 10, "bob in epoch 1")
    header = header_bytes(EnvelopeKind.TEXT, 0, index, 0, step, signed=False)
    plaintext, _, _ = encode_plaintext(TextMessage(sent_at=1, text="from alice: trust carol"))
    forged = header + aead_seal(
        step_keys(ck)[0], step.to_bytes(12, "big"), plaintext, header + decode_id(cid)
    )
    publish(devices.broker, Topics().msg(cid), forged)
    alice.send(cid, "a1, epoch 1")
    wait_until(lambda: "a1, epoch 1" in texts(bob, cid), 10, "bob hears alice in epoch 1")
    wait_until(
        lambda: bob.engine.counters["chain_closed"] > 0 or len(texts(bob, cid)) > 2,
        10,
        "the forgery is judged",
    )
    assert texts(bob, cid) == ["a0", "a1, epoch 1"]


def test_an_unsigned_sender_far_ahead_is_reached_and_shown(mosquitto_devices: Devices) -> None:
    """1,500 unsigned steps lost: the receiver derives at most 512 steps per envelope
    before authenticating, holds what is further, and shows every later message."""
    devices = mosquitto_devices
    cid, (alice, bob) = members(devices, Policy(sign_every=0), "alice", "bob")
    with alice.state.transaction():
        for i in range(1_500):  # sealed, never published: a stretch a broker lost
            alice.engine.seal(cid, TextMessage(sent_at=1, text=f"lost {i}"))
    after = [f"after {i}" for i in range(6)]
    for line in after:
        alice.send(cid, line)
    wait_until(lambda: sorted(texts(bob, cid)) == after, 20, "every later message")
    assert bob.counters["rejected_unsigned_jump"] == 0  # held and opened, none refused
    assert bob.engine.counters["unsigned_jump"] >= 2


def test_a_member_that_missed_epochs_fetches_their_rosters_from_the_gateway(gateway_stack) -> None:
    """Bob's offline queue overflowed while Alice invited twice: he comes back to the
    retained roster of epoch 2 without epoch 1, fetches the chain from the gateway,
    verifies it from epoch 0, and only then grants his new chain."""
    _, gateway, devices = gateway_stack
    alice = devices.make("alice")
    bob = devices.make("bob", start=False)
    bob.history = GatewayHistory(gateway.base, bob.engine.identity)
    bob.start().wait_connected(10)
    carol, dave = devices.make("carol"), devices.make("dave")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    path, history = bob.state.path, bob.history
    bob.close()  # Mosquitto keeps his session and STACK_QUEUE of its messages
    devices.open.remove(bob)

    for i in range(2 * STACK_QUEUE):  # one PUBLISH each (a burst shares frames): his queue fills
        alice.send(cid, f"m{i}")
        assert alice.wait_drained(10)
    alice.invite(cid, [carol.pid])
    wait_until(lambda: carol.engine.is_member(cid), 10, "carol joins")
    alice.invite(cid, [dave.pid])
    wait_until(lambda: dave.engine.is_member(cid), 10, "dave joins")

    bob = Device(path, devices.broker.options(bob.pid), link=FAST, history=history)
    devices.open.append(bob)
    bob.start()
    wait_until(
        lambda: bob.engine.is_member(cid) and bob.engine.roster(cid).epoch == 2,
        20,
        "bob follows to epoch 2",
    )
    # Roster 2 came first (retained), 1 from the gateway (0 too, a duplicate).
    wait_until(lambda: bob.counters["rosters_fetched"] >= 2, 10, "the fetch is counted")
    assert bob.counters["roster_pending"] >= 1
    bob.send(cid, "back")
    wait_until(lambda: "back" in texts(alice, cid), 10, "alice reads bob's new chain")


def test_outbox_rows_of_proposed_and_inbox_rosters_are_rosters(tmp_path: Path) -> None:
    """Rosters no longer travel retained: the outbox tells them by topic and kind byte,
    so they never share a frame with envelopes (PROTOCOL.md §3.4)."""
    alice, bob, carol = (Device(tmp_path / f"{n}.db") for n in ("alice", "bob", "carol"))
    try:
        with alice.state.transaction():
            for other in (bob, carol):
                alice.engine.learn_bundle(other.engine.identity.bundle.to_bytes())
        cid = alice.create_conversation([bob.pid])
        alice.invite(cid, [carol.pid])
        rows = [(r.topic.rsplit("/", 1)[1], r.what, r.retain) for r in alice.outbox()]
        assert rows.count(("propose", "roster", False)) == 2
        assert rows.count(("inbox", "roster", False)) == 1  # epoch 0, to Carol
        assert ("roster", "roster", True) not in rows
        assert {what for topic, what, _ in rows if topic == "inbox"} == {"roster", "grant"}
    finally:
        for device in (alice, bob, carol):
            device.close()
