"""The broker's parts without sockets (issue 15 item 5): delivery through an outlet that
records what it is given, the subscription index, admission, acknowledgement order, and
the router's decisions as values (takeover, publish outcomes). Clocks are injected."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from fieldchat.broker import BrokerMetrics, Deny, Limits, Principal
from fieldchat.broker._acks import Acks
from fieldchat.broker._delivery import Delivery
from fieldchat.broker._outlet import Close
from fieldchat.broker._quota import Admission
from fieldchat.broker._router import Router
from fieldchat.broker._session import Message, Session, SubOptions
from fieldchat.broker._subscriptions import Subscriptions
from fieldchat.broker.testing import make_config
from fieldchat.schemas import mqtt
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, X

T = Topics()


@dataclass
class Recorder:
    """An :class:`~broker._outlet.Outlet` that keeps what it is sent."""

    window: int = 100
    backlog: int = 0
    refuse: bool = False
    sent: list[tuple[str, bytes, int, int | None, bool]] = field(default_factory=list)
    kicked: list[Close] = field(default_factory=list)

    def buffered(self) -> int:
        return self.backlog

    def send(self, message: Message, qos: int, packet_id: int | None, *, dup: bool) -> bool:
        if self.refuse:
            return False
        self.sent.append((message.topic, message.payload, qos, packet_id, dup))
        return True

    def kick(self, reason: Close) -> None:
        self.kicked.append(reason)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def delivery(clock: Clock | None = None, **limits: int) -> tuple[Delivery, BrokerMetrics, set[str]]:
    """A delivery whose receivers may read every topic except those in the returned set."""
    metrics = BrokerMetrics()
    forbidden: set[str] = set()
    parts = Delivery(
        Limits(**limits), metrics, clock or Clock(), lambda _s, topic: topic not in forbidden
    )
    return parts, metrics, forbidden


def session(outlet: Recorder | None = None) -> Session:
    s = Session(ALICE.pid, Principal(ALICE.pid, "participant"), persistent=True)
    s.outlet = outlet
    return s


def test_the_window_holds_the_rest_and_an_ack_moves_it_on():
    parts, _, _ = delivery()
    outlet = Recorder(window=2)
    alice = session(outlet)
    for i in range(3):
        parts.deliver(alice, T.inbox(ALICE.pid), b"m%d" % i, 1, retain=False)
    assert [(p, pid) for _, p, _, pid, _ in outlet.sent] == [(b"m0", 1), (b"m1", 2)]
    assert [m.payload for m in alice.queue] == [b"m2"]
    parts.acked(alice, 1)
    assert outlet.sent[-1][1:4] == (b"m2", 1, 3)
    assert list(alice.inflight) == [2, 3]


def test_a_resumed_session_gets_its_inflight_again_with_dup_in_order():
    parts, _, _ = delivery()
    alice = session(Recorder(window=2))
    for i in range(3):
        parts.deliver(alice, T.inbox(ALICE.pid), b"m%d" % i, 1, retain=False)
    again = Recorder(window=2)
    alice.outlet = again
    parts.resume(alice)
    assert [(p, pid, dup) for _, p, _, pid, dup in again.sent] == [
        (b"m0", 1, True),
        (b"m1", 2, True),
    ]


def test_queued_messages_that_expired_or_became_unreadable_are_not_sent():
    clock = Clock()
    parts, metrics, forbidden = delivery(clock)
    alice = session()  # offline: everything queues
    inbox, other = T.inbox(ALICE.pid), T.msg(X)
    parts.deliver(alice, inbox, b"old", 1, retain=False, expires_at=clock.now + 5)
    parts.deliver(alice, other, b"gone", 1, retain=False)
    parts.deliver(alice, inbox, b"fresh", 1, retain=False)
    clock.now += 10
    forbidden.add(other)  # e.g. removed from the conversation meanwhile
    alice.outlet = outlet = Recorder()
    parts.pump(alice)
    assert [p for _, p, *_ in outlet.sent] == [b"fresh"]
    assert metrics.value("fieldchat_broker_queue_drops_total", reason="expired") == 1


def test_a_full_queue_drops_its_oldest_and_counts():
    parts, metrics, _ = delivery(max_queued_messages=2)
    alice = session()
    for i in range(3):
        parts.deliver(alice, T.inbox(ALICE.pid), b"m%d" % i, 1, retain=False)
    assert [m.payload for m in alice.queue] == [b"m1", b"m2"]
    assert metrics.value("fieldchat_broker_queue_drops_total", reason="overflow") == 1


def test_qos0_is_never_queued_and_dropped_for_a_socket_far_behind():
    parts, metrics, _ = delivery()
    alice = session()
    parts.deliver(alice, T.inbox(ALICE.pid), b"offline", 0, retain=False)
    alice.outlet = outlet = Recorder(backlog=2 << 20)
    parts.deliver(alice, T.inbox(ALICE.pid), b"behind", 0, retain=False)
    outlet.backlog = 0
    parts.deliver(alice, T.inbox(ALICE.pid), b"sent", 0, retain=False)
    assert not alice.queue
    assert [(p, q, pid) for _, p, q, pid, _ in outlet.sent] == [(b"sent", 0, None)]
    assert metrics.value("fieldchat_broker_queue_drops_total", reason="slow_consumer") == 1


def test_a_message_the_client_cannot_take_counts_as_delivered():
    parts, _, _ = delivery()
    alice = session(Recorder(refuse=True))  # e.g. above its Maximum Packet Size
    parts.deliver(alice, T.inbox(ALICE.pid), b"big", 1, retain=False)
    assert not alice.inflight
    assert not alice.queue


def test_one_copy_per_session_at_the_highest_qos_with_every_identifier():
    subs = Subscriptions()
    subs.add("a", T.inbox(ALICE.pid), SubOptions(0, identifier=1))
    subs.add("a", f"{T.prefix}/p/+/inbox", SubOptions(1, identifier=2))
    subs.add("b", f"{T.prefix}/p/#", SubOptions(1, no_local=True))
    targets, merged = subs.match(T.inbox(ALICE.pid), lambda _: True)
    assert set(targets) == {"a", "b"}
    assert merged["a"] == (1, False, (1, 2))
    assert targets["b"].no_local
    subs.remove("a", f"{T.prefix}/p/+/inbox")
    targets, merged = subs.match(T.inbox(ALICE.pid), lambda _: True)
    assert targets["a"] == SubOptions(0, identifier=1)
    assert not merged


def test_a_shared_group_takes_turns_among_connected_members():
    subs = Subscriptions()
    for member in ("g1", "g2", "g3"):
        subs.add(member, f"$share/archive/{T.prefix}/c/+/msg", SubOptions(1))
    topic = T.msg(X)
    up = {"g1", "g3"}
    picked = [next(iter(subs.match(topic, up.__contains__).targets)) for _ in range(4)]
    assert picked == ["g1", "g3", "g3", "g1"]


def test_admission_refuses_past_the_caps_and_evicts_the_oldest_waiting():
    door: Admission[str] = Admission(max_connections=4, per_address=2, pending=2)
    assert door.admit("a1", "10.0.0.1") == (None, None)
    assert door.admit("a2", "10.0.0.1") == (None, None)
    assert door.admit("a3", "10.0.0.1") == (Close.PENDING_PER_ADDRESS, None)
    assert door.admit("b1", "10.0.0.2") == (None, "a1")  # two wait at most: the oldest goes
    door.leave("a1")
    door.connected("a2")
    door.connected("b1")
    assert door.admit("c1", "10.0.0.3") == (None, None)
    assert door.admit("c2", "10.0.0.3") == (None, None)
    # four connections, two of them waiting at their cap: the oldest waiting makes room
    assert door.admit("d1", "10.0.0.4") == (None, "c1")
    door.connected("c2")
    door.connected("d1")
    assert door.admit("e1", "10.0.0.5") == (Close.MAX_CONNECTIONS, None)


async def test_acknowledgements_keep_publish_order_and_stop_at_a_failed_commit():
    loop = asyncio.get_running_loop()
    written: list[bytes] = []
    failed: list[bool] = []
    acks = Acks(written.append, lambda: failed.append(True))
    first, second = loop.create_future(), loop.create_future()
    acks.send(b"1", first)
    acks.send(b"2", None)  # no commit of its own, but after 1
    acks.send(b"3", second)
    assert written == []
    assert len(acks) == 3
    first.set_result(None)
    await asyncio.sleep(0)  # the done callback runs on the loop
    assert written == [b"1", b"2"]
    second.set_exception(OSError("disk full"))
    acks.send(b"4", None)
    await asyncio.sleep(0)
    assert written == [b"1", b"2"]
    assert failed == [True]


async def test_the_router_decides_and_the_connection_acts_on_values(tmp_path):
    config = make_config(tmp_path).model_copy(update={"persistence": False})
    router = Router(config, BrokerMetrics())
    router.open(asyncio.get_running_loop())
    try:
        alice_p, bob_p = Principal(ALICE.pid, "participant"), Principal(BOB.pid, "participant")
        first = Recorder()
        resume = mqtt.Connect(ALICE.pid, clean_start=False)  # 3.1.1, clean session 0
        alice, present = router.attach(alice_p, first, resume)
        assert not present
        grants, replay = router.subscribe(
            alice, mqtt.Subscribe(1, (mqtt.Subscription(T.inbox(ALICE.pid), 1),))
        )
        assert grants == [SubOptions(1)]
        assert replay == [(T.inbox(ALICE.pid), SubOptions(1))]

        second = Recorder()  # alice again: takeover
        again, present = router.attach(alice_p, second, resume)
        assert again is alice and present
        assert first.kicked == [Close.TAKEOVER]
        router.detach(alice, first, None)  # the old connection's close changes nothing
        assert alice.outlet is second

        bob, _ = router.attach(bob_p, Recorder(), mqtt.Connect(BOB.pid))
        published = router.publish(bob_p, bob, mqtt.Publish(T.inbox(ALICE.pid), b"hi", 1))
        assert (published.denial, published.fanout, published.pending) == (None, 1, None)
        assert second.sent[-1][:3] == (T.inbox(ALICE.pid), b"hi", 1)

        refused = router.publish(bob_p, bob, mqtt.Publish(T.bundle(ALICE.pid), b"k", 1))
        assert (refused.denial, refused.disconnect, refused.fanout) == (Deny.NOT_OWNER, True, 0)
        with pytest.raises(Exception, match="No Local"):
            router.subscribe(
                bob,
                mqtt.Subscribe(2, (mqtt.Subscription(f"$share/g/{T.inbox(BOB.pid)}", 1, True),)),
            )
    finally:
        router.close()
