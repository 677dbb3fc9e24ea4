"""Unsigned junk served beside the genuine envelope never takes its place on screen.

The archive keeps every distinct unsigned candidate of a step (docs/gateway.md,
"Receivers"): history may serve junk for a step before the genuine envelope. A device
holds envelopes that overtook a missing step, for per-sender order; only candidates
that authenticate may wait there, so junk cannot stand in for the genuine one, live or
from history (issue 13, item 3). Real Mosquitto, a real gateway process, real devices.
"""

from __future__ import annotations

import os
import time

import pytest

from fieldchat.device.history import GatewayHistory
from fieldchat.schemas import Policy, TextMessage
from fieldchat.schemas.envelope import read_header
from tests.device.conftest import Devices, Mosquitto, texts, wait_until
from tests.gateway._support import GatewayProcess

pytestmark = pytest.mark.mosquitto


def _publish(broker: Mosquitto, topic: str, payloads: list[bytes]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-member")
    raw.username_pw_set("raw-member", broker.user("raw-member"))
    raw.connect("127.0.0.1", broker.port)
    raw.loop_start()
    try:
        for payload in payloads:  # one after the other: the archive keeps this order
            raw.publish(topic, payload, qos=1).wait_for_publish(5)
            time.sleep(0.2)
    finally:
        raw.disconnect()
        raw.loop_stop()


def test_junk_waiting_for_a_step_does_not_displace_the_genuine_envelope(
    gateway_stack: tuple[Mosquitto, GatewayProcess, Devices],
) -> None:
    broker, gateway, devices = gateway_stack
    alice = devices.make("alice")
    bob = devices.make("bob")
    cid = alice.create_conversation([bob.pid], policy=Policy(sign_every=0))
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    with alice.state.transaction():  # sealed as alice's device would, published by hand
        genuine = [
            alice.engine.seal(cid, TextMessage(sent_at=int(time.time()), text=f"m{i}"))
            for i in range(3)
        ]
    assert [read_header(e)[5] for e in genuine] == [0, 1, 2]
    header_len = read_header(genuine[2])[6]
    junk = genuine[2][:header_len] + os.urandom(len(genuine[2]) - header_len)
    # Published and archived in this order (a member racing alice's steps).
    _publish(broker, alice.topics.msg(cid), [genuine[0], junk, genuine[2], genuine[1]])
    archive = GatewayHistory(gateway.base, alice.engine.identity)
    archived: list[bytes] = []

    ours = {*genuine, junk}  # bob's receipts are archived too

    def all_archived() -> bool:
        archived.extend(e for e in archive.conversation(cid) if e in ours)  # after its cursor
        return len(archived) >= 4

    wait_until(all_archived, 20, "the four envelopes archived")
    assert archived == [genuine[0], junk, genuine[2], genuine[1]]

    # Live, in the archive's order: the junk of step 2 waits for step 1 when step 2
    # comes; only what authenticates may wait, so step 2 is shown in its turn.
    wait_until(lambda: texts(bob, cid) == ["m0", "m1", "m2"], 20, "every genuine message")
    assert bob.counters["rejected_auth"] >= 1  # the junk, refused before it could wait
