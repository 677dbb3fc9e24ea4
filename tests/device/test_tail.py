"""A lost tail: what a broker dropped at the end of a run comes from the gateway.

Gap recovery needs a later message to reveal a gap; messages lost last (Mosquitto
drops what overflows ``max_queued_messages`` of an offline session) reveal none. A
device with a history source asks the gateway after each connect and while idle
(``Device._tail``). Real Mosquitto, a real gateway process, real devices.
"""

from __future__ import annotations

import time

import pytest

from fieldchat.device.client import Device
from fieldchat.device.events import MessageReceived
from fieldchat.device.history import GatewayHistory
from tests.device.conftest import FAST, STACK_QUEUE, Devices, Mosquitto, texts, wait_until
from tests.gateway._support import GatewayProcess

pytestmark = pytest.mark.mosquitto

QUEUE = STACK_QUEUE  # Mosquitto's max_queued_messages here: an offline session keeps this many


@pytest.fixture
def stack(gateway_stack: tuple[Mosquitto, GatewayProcess, Devices]):
    return gateway_stack


def _with_history(devices: Devices, name: str, gateway: GatewayProcess) -> Device:
    """A device that asks ``gateway`` for lost tails (every second while idle)."""
    device = devices.make(name, start=False)
    device.history = GatewayHistory(gateway.base, device.engine.identity)
    device.options = FAST.model_copy(update={"history_tail_s": 1.0})
    return device.start()


def test_messages_the_broker_dropped_while_offline_come_from_the_gateway(stack) -> None:
    broker, gateway, devices = stack
    alice = devices.make("alice")
    bob = _with_history(devices, "bob", gateway)
    bob.wait_connected(10)
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    alice.send(cid, "before")
    wait_until(lambda: texts(bob, cid) == ["before"], 10, "bob online")
    # A new member's grant brings one resend of what he has not receipted; over before
    # he goes, or it races the tail this test is about.
    wait_until(lambda: not alice._worker.outbound.resends.grants, 10, "the grant's resend")
    path, pid, events = bob.state.path, bob.pid, devices.events[bob.pid]
    bob.close()  # a clean disconnect: Mosquitto keeps his session, QUEUE messages of it
    devices.open.remove(bob)

    archive = GatewayHistory(gateway.base, alice.engine.identity)
    archived = len(archive.conversation(cid))
    lines = [f"m{i}" for i in range(6 * QUEUE)]
    for i in range(0, len(lines), QUEUE // 2):
        alice.send_many(cid, lines[i : i + QUEUE // 2])
        assert alice.wait_drained(10)
    end = time.monotonic() + 20  # the gateway archives every one (it is online)
    while archived < 1 + len(lines) and time.monotonic() < end:
        archived += len(archive.conversation(cid))
        time.sleep(0.1)
    assert archived >= 1 + len(lines)
    alice.close()  # gone too: only the gateway can give bob what the broker dropped
    devices.open.remove(alice)

    events.clear()
    bob = Device(
        path,
        broker.options(pid),
        link=FAST.model_copy(update={"history_tail_s": 1.0}),
        on_event=events.append,
    )
    bob.history = GatewayHistory(gateway.base, bob.engine.identity)
    devices.open.append(bob)
    bob.start().wait_connected(10)
    wait_until(lambda: texts(bob, cid) == ["before", *lines], 30, "every message, in order")
    shown = [e.text for e in events if isinstance(e, MessageReceived)]
    assert shown == lines  # each once, in the sender's order
    # The broker kept only its queue: QUEUE publishes, which hold several envelopes each
    # when alice framed a backlog (how many depends on timing: `>= 50` failed whenever
    # she did). Alice is gone, so the rest can only have come from the gateway.
    assert bob.counters["history_tail_fetched"] >= 1
    time.sleep(1.5)  # a further idle round finds nothing new and shows nothing twice
    assert texts(bob, cid) == ["before", *lines]
    assert [e.text for e in events if isinstance(e, MessageReceived)] == lines


def test_a_late_member_does_not_download_epochs_it_cannot_open(stack) -> None:
    """The tail round names the oldest epoch the device holds keys of (``from_epoch``):
    the gateway starts there, so a member invited into a long conversation does not
    fetch its whole earlier history over a slow link only to drop it."""
    _, gateway, devices = stack
    alice = devices.make("alice")
    bob = devices.make("bob")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    early = [f"early {i}" for i in range(40)]
    alice.send_many(cid, early)
    assert alice.wait_drained(10)
    archive = GatewayHistory(gateway.base, alice.engine.identity)
    archived: list[bytes] = []
    end = time.monotonic() + 20
    while len(archived) < len(early) and time.monotonic() < end:
        archived += archive.conversation(cid)
        time.sleep(0.1)
    assert len(archived) >= len(early)

    carol = _with_history(devices, "carol", gateway)
    carol.wait_connected(10)
    alice.invite(cid, [carol.pid])  # a new epoch: carol holds its keys only
    wait_until(lambda: carol.engine.is_member(cid), 10, "carol joins")
    assert carol.engine.oldest_epoch(cid) == alice.engine.roster(cid).epoch > 0
    alice.send(cid, "welcome")
    wait_until(lambda: texts(carol, cid) == ["welcome"], 10, "carol reads the new epoch")
    # A round ends (with `have`, it may fetch nothing: carol holds what she was sent).
    wait_until(lambda: carol.counters["history_tail_rounds"] > 0, 10, "a tail round")
    time.sleep(1.5)  # and another
    assert carol.counters["history_tail_fetched"] < len(early)  # the new epoch's only
    assert texts(carol, cid) == ["welcome"]
