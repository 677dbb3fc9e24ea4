"""A joining member that missed its conversation's retained roster asks the broker
again (device/roster_wait.py): the schedule, and the device on real brokers."""

from __future__ import annotations

import itertools
from functools import partial

from fieldchat.device.roster_wait import ATTEMPTS, FIRST_S, MAX_S, RosterWait
from fieldchat.schemas import mqtt
from tests.device._wire import Front
from tests.device.conftest import Devices, texts, wait_until

# -- the schedule (pure) ----------------------------------------------------------------


def _asks(wait: RosterWait, cid: str, until: float, step: float = 0.5) -> list[float]:
    """The times ``cid`` is due while it waits from 0 to ``until``."""
    times = []
    now = 0.0
    while now <= until:
        if wait.due(now, [cid]):
            times.append(now)
        now += step
    return times


def test_a_waiting_conversation_is_asked_for_with_backoff_a_bounded_number_of_times() -> None:
    times = _asks(RosterWait(), "c1", 1_000.0)
    assert times[0] == FIRST_S  # not at once: the retained roster usually comes
    assert len(times) == ATTEMPTS
    assert [b - a for a, b in itertools.pairwise(times)] == [10.0, 20.0, 40.0, MAX_S, MAX_S]


def test_a_conversation_no_longer_waiting_is_forgotten_and_starts_afresh() -> None:
    wait = RosterWait()
    assert wait.due(0.0, ["c1", "c2"]) == []
    assert wait.due(FIRST_S, ["c1", "c2"]) == ["c1", "c2"]
    assert wait.due(FIRST_S + 1, ["c2"]) == []  # c1's roster came
    assert wait.due(FIRST_S + 2, ["c1", "c2"]) == []  # c1 waits again: a new wait
    assert wait.due(2 * FIRST_S + 2, ["c1", "c2"]) == ["c1"]


def test_a_new_connection_starts_the_count_afresh() -> None:
    wait = RosterWait()
    assert len(_asks(wait, "c1", 1_000.0)) == ATTEMPTS
    assert wait.due(2_000.0, ["c1"]) == []  # spent on this connection
    wait.reconnected()
    assert wait.due(2_000.0, ["c1"]) == []
    assert wait.due(2_000.0 + FIRST_S, ["c1"]) == ["c1"]


# -- on real brokers ---------------------------------------------------------------------


def test_a_member_that_missed_the_retained_roster_joins_by_asking_again(
    devices: Devices,
) -> None:
    """Bob gets his delivery, subscribes to the roster topic, and the broker's answer is
    lost (a NATS node that did not know the retained roster yet). Without asking again
    he would hold his delivery for ever; with it he joins FIRST_S later."""
    roster_topics: list[str] = []

    def lose_first_roster(packet: mqtt.Packet) -> bool:
        if not (isinstance(packet, mqtt.Publish) and packet.topic.endswith("/roster")):
            return False
        if not roster_topics or (packet.dup and packet.topic == roster_topics[0]):
            roster_topics.append(packet.topic)
            return True  # the first one, and the broker's retries of it
        return False

    front = Front(devices.broker.port, drop_down=lose_first_roster)
    try:
        alice = devices.make("alice")
        bob = devices.make("bob", port=front.port, protocol="3.1.1")
        cid = alice.create_conversation([bob.pid])
        assert bob.wait_for(partial(bob.engine.is_member, cid), FIRST_S + 15), (
            f"bob never joined: {dict(bob.counters)}"
        )
        assert roster_topics and roster_topics[0] == bob.topics.roster(cid)
        assert bob.counters["roster_asked_again"] >= 1
        alice.send(cid, "hello bob")
        wait_until(lambda: "hello bob" in texts(bob, cid), 15, "the text")
    finally:
        front.close()
