"""The Device library against a real Mosquitto on 127.0.0.1."""

from __future__ import annotations

import pytest

from device.events import Joined, MessageReceived, ReceiptReceived
from tests.device.conftest import Devices, Mosquitto, texts, wait_until

pytestmark = pytest.mark.mosquitto


def test_two_devices_talk_both_ways(devices: Devices) -> None:
    alice = devices.make("alice")
    bob = devices.make("bob")
    # "auto" speaks MQTT 5 where the broker does and falls back to 3.1.1 elsewhere.
    assert alice.protocol == ("5" if isinstance(devices.broker, Mosquitto) else "3.1.1")

    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    alice.send(cid, "hello bob")
    wait_until(lambda: texts(bob, cid) == ["hello bob"], 10, "bob receives")
    bob.send(cid, "hi alice")
    wait_until(lambda: texts(alice, cid) == ["hi alice"], 10, "alice receives")

    received = [e for e in devices.events[bob.pid] if isinstance(e, MessageReceived)]
    assert [(e.sender, e.text, e.signed) for e in received] == [(alice.pid, "hello bob", True)]
    assert any(isinstance(e, Joined) and e.cid == cid for e in devices.events[bob.pid])
    # Bob's delivery receipt comes back to Alice, encrypted like any message.
    wait_until(
        lambda: any(isinstance(e, ReceiptReceived) and e.sender == bob.pid
                    for e in devices.events[alice.pid]),
        10, "a delivery receipt",
    )
    assert alice.wait_drained(5)
