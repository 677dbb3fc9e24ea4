"""The device on MQTT 5 against the embedded broker on loopback (issue 17, device side):
a refused publish is surfaced and not resent, topic aliases, No Local, and the fall
back to 3.1.1 on a broker that refuses 5."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fieldchat.device.client import Device
from fieldchat.device.events import PublishRefused
from fieldchat.schemas.envelope import EnvelopeKind, read_header
from fieldchat.schemas.frame import split
from tests.device._wire import V5, V311, Front
from tests.device.conftest import FAST, Devices, Embedded, conversation, texts, wait_until

NOT_AUTHORIZED = 0x87


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Embedded]:
    broker = Embedded(tmp_path / "embedded").start()
    yield broker
    broker.close()


@pytest.fixture
def on_embedded(tmp_path: Path, embedded: Embedded) -> Iterator[Devices]:
    made = Devices(tmp_path, embedded)
    yield made
    made.close()


def _refusals(devices: Devices, pid: str) -> list[PublishRefused]:
    return [e for e in devices.events[pid] if isinstance(e, PublishRefused)]


def test_a_publish_the_broker_refuses_is_surfaced_and_never_resent(
    on_embedded: Devices, embedded: Embedded
) -> None:
    """Regression (issue 17): the broker denies alice the conversation (an override,
    as after a removal it has not learned of): her message gets PUBACK 0x87. It used
    to be dropped from the outbox with a log line only, its ciphertext kept and
    published again after every reconnect (unreceipted by bob), refused each time.
    Now: one PublishRefused event, a counter, out of the outbox, and nothing
    published again after reconnects."""
    cid, (alice, bob) = conversation(on_embedded, "alice", "bob")
    assert alice.protocol == "5"
    assert embedded.thread is not None
    embedded.thread.deny(alice.pid, cid)

    alice.send(cid, "after the broker said no")
    wait_until(lambda: bool(_refusals(on_embedded, alice.pid)), 10, "the refusal")
    (refused,) = _refusals(on_embedded, alice.pid)
    assert (refused.cid, refused.what, refused.code, refused.messages) == (
        cid,
        "msg",
        NOT_AUTHORIZED,
        1,
    )
    assert refused.reason == "Not authorized"
    assert refused.to_json()["type"] == "publish_refused"
    assert alice.wait_drained(5), "a refused message left the outbox"
    assert alice.counters["refused_by_broker"] == 1

    for _ in range(2):  # reconnects: unreceipted own texts are resent resend_after_s later
        connects = alice.counters["connects"]
        assert alice._link is not None
        alice._link.kick()

        def back(c: int = connects) -> bool:
            return alice.counters["connects"] > c and alice.connected

        wait_until(back, 10)
        wait_until(
            lambda: alice._worker.outbound.resends.planned is None,
            FAST.resend_after_s + 5,
            "the resend round",
        )
        assert alice.wait_drained(5)
    assert alice.counters["resent"] == 0
    assert alice.counters["refused_by_broker"] == 1
    assert len(_refusals(on_embedded, alice.pid)) == 1
    assert texts(bob, cid) == []


def test_a_removed_member_s_queued_message_is_refused_not_resent(
    on_embedded: Devices,
) -> None:
    """The race the refusal is for: carol, offline, is removed and then writes. When
    she reconnects her outbox leaves before she could learn of the new roster; the
    broker knows it and refuses (0x87). Nobody receives the text, and it does not
    come back after a reconnect."""
    cid, (alice, bob, carol) = conversation(on_embedded, "alice", "bob", "carol")
    path, broker = carol.state.path, carol.broker
    on_embedded.open.remove(carol)
    carol.close()
    alice.remove(cid, [carol.pid])
    wait_until(lambda: bob.engine.roster(cid).epoch == 1, 15, "bob in the new epoch")

    events = on_embedded.events[carol.pid]
    carol = Device(path, broker, link=FAST, prefix="fc/v1", on_event=events.append)
    on_embedded.open.append(carol)
    carol.send(cid, "written after my removal")  # she does not know yet
    carol.start()
    wait_until(lambda: bool(_refusals(on_embedded, carol.pid)), 10, "the refusal")
    (refused,) = _refusals(on_embedded, carol.pid)
    assert (refused.cid, refused.code) == (cid, NOT_AUTHORIZED)
    # The frame may also carry the receipts close() flushed into her outbox: all of it
    # is refused together, once.
    assert refused.messages >= 1
    assert carol.counters["refused_by_broker"] == refused.messages
    assert carol.wait_drained(5)
    assert carol._link is not None
    connects = carol.counters["connects"]
    carol._link.kick()
    wait_until(lambda: carol.counters["connects"] > connects and carol.connected, 10)
    wait_until(
        lambda: carol._worker.outbound.resends.planned is None,
        FAST.resend_after_s + 5,
        "the resend round",
    )
    assert carol.wait_drained(5)
    assert carol.counters["refused_by_broker"] == refused.messages
    assert len(_refusals(on_embedded, carol.pid)) == 1
    assert "written after my removal" not in texts(alice, cid) + texts(bob, cid)


# -- through a front that reads the packets -------------------------------------------


def _granted(device: Device, cid: str) -> bool:
    return len(device.engine._convs[cid].recv) == 1


def _kinds(publishes: list[Any]) -> list[EnvelopeKind]:
    return [read_header(e)[0] for p in publishes for e in split(p.payload)]


def test_conversation_topics_are_aliased_and_own_messages_not_echoed(
    on_embedded: Devices, embedded: Embedded
) -> None:
    """Topic Alias (MQTT 5 §3.3.2.3.4): the conversation's topic travels once per
    connection, then a two-byte alias, both ways (bob announces a Topic Alias Maximum,
    so the broker aliases what it sends him); No Local (§3.8.3.1): alice's own
    messages do not come back to her (on 3.1.1 every one did, and was PUBACKed)."""
    front = Front(embedded.port)
    bob_front = Front(embedded.port)
    try:
        alice = on_embedded.make("alice", port=front.port)
        bob = on_embedded.make("bob", port=bob_front.port)
        cid = alice.create_conversation([bob.pid])
        wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
        wait_until(lambda: len(alice.engine._convs[cid].recv) == 1, 10, "bob's chain")
        # Bob's JOINED control (step 0 of his chain, PROTOCOL.md §6.6) heard first, so
        # nothing alice sends is published again for him.
        (bobs,) = alice.engine._convs[cid].recv.values()
        wait_until(lambda: bobs.step >= 1, 10, "bob's JOINED")
        for i in range(30):
            alice.send(cid, f"m{i}")
            assert alice.wait_drained(5)  # one PUBLISH each, not a frame
        wait_until(lambda: len(texts(bob, cid)) == 30, 10, "bob has them")
        wait_until(lambda: not bob.receipts_pending and not bob.outbox(), 10, "receipts out")
        link = front.last
        assert link.level == V5
        topic = alice.topics.msg(cid)
        up = link.on(topic)
        named = [p for p in up if p.topic]
        assert len(named) == 1, "the topic once"
        alias = named[0].properties.topic_alias
        assert alias is not None
        texts_sent = [p for p in up if _kinds([p]) == [EnvelopeKind.TEXT]]
        assert len(texts_sent) == 30
        assert all(p.topic == "" and p.properties.topic_alias == alias for p in texts_sent[1:])
        # No Local: what comes down on the conversation is bob's receipts, never our texts.
        down = link.on(topic, down=True)
        assert down, "bob's receipts arrive"
        assert EnvelopeKind.TEXT not in _kinds(down)
        # What the broker sends bob: named once, then aliased; he shows all 30.
        to_bob = bob_front.last.on(topic, down=True)
        assert [p.topic for p in to_bob if p.topic] == [topic]
        assert _kinds(to_bob).count(EnvelopeKind.TEXT) == 30
        assert {p.properties.topic_alias for p in to_bob} == {to_bob[0].properties.topic_alias}
    finally:
        front.close()
        bob_front.close()


def test_the_broker_s_topic_alias_maximum_is_honoured(tmp_path: Path) -> None:
    """A broker allowing one alias: the first conversation gets it, the second travels
    with its topic name every time, and no alias above the maximum is ever sent."""
    from fieldchat.broker.testing import make_config

    embedded = Embedded(tmp_path / "embedded")
    embedded.config = make_config(tmp_path / "embedded", topic_alias_maximum=1)
    embedded.start()
    front = Front(embedded.port)
    devices = Devices(tmp_path, embedded)
    try:
        alice = devices.make("alice", port=front.port)
        bob = devices.make("bob")
        cids = [alice.create_conversation([bob.pid]) for _ in range(2)]
        for cid in cids:
            wait_until(partial(_granted, alice, cid), 10, "grants")
        for i in range(5):
            for cid in cids:
                alice.send(cid, f"m{i}")
                assert alice.wait_drained(5)
        wait_until(lambda: all(len(texts(bob, c)) == 5 for c in cids), 10, "bob has them")
        publishes = front.last.publishes()
        aliases = {p.properties.topic_alias for p in publishes} - {None}
        assert aliases == {1}
        second = alice.topics.msg(cids[1])
        assert sum(p.topic == second for p in publishes) >= 5, "named every time"
        assert all(p.properties.topic_alias is None for p in publishes if p.topic == second)
    finally:
        devices.close()
        front.close()
        embedded.close()


@pytest.mark.parametrize("refusal", ["connack", "connack311"])
def test_falls_back_to_3_1_1_on_a_broker_refusing_5(
    on_embedded: Devices, embedded: Embedded, refusal: str
) -> None:
    """CONNACK 0x84 (an MQTT 5 server) or 3.1.1's return code 1 (a 3.1.1 server,
    MQTT-3.1.2-2): 3.1.1 at once, remembered; the conversation works; the next start
    goes straight to 3.1.1."""
    front = Front(embedded.port, refuse_v5=refusal)
    try:
        alice = on_embedded.make("alice", port=front.port)
        assert alice.protocol == "3.1.1"
        assert front.levels == [V5, V311]
        assert (alice.state.get_meta("protocol") or "").startswith("3.1.1 ")
        bob = on_embedded.make("bob")
        cid = alice.create_conversation([bob.pid])
        wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
        alice.send(cid, "over 3.1.1")
        wait_until(lambda: texts(bob, cid) == ["over 3.1.1"], 10, "bob receives")
        again = on_embedded.reopen(alice)
        again.wait_connected(10)
        assert again.protocol == "3.1.1"
        assert front.levels == [V5, V311, V311]
    finally:
        front.close()


def test_one_connect_closed_without_connack_does_not_downgrade(
    on_embedded: Devices, embedded: Embedded
) -> None:
    """A broker that sheds a socket before its CONNACK (the embedded broker evicts
    pending sockets under a flood): one connection on 3.1.1, then 5 again; nothing
    remembered. It used to store 3.1.1 for good."""
    front = Front(embedded.port, close_v5_times=1)
    try:
        alice = on_embedded.make("alice", port=front.port)
        assert front.levels == [V5, V311]
        assert alice.protocol == "3.1.1"
        assert alice._link is not None
        connects = alice.counters["connects"]
        alice._link.kick()
        wait_until(lambda: alice.counters["connects"] > connects and alice.connected, 10)
        assert alice.protocol == "5"
        assert front.levels == [V5, V311, V5]
        assert not (alice.state.get_meta("protocol") or "").startswith("3.1.1")
    finally:
        front.close()


def test_an_inbound_alias_never_set_or_out_of_range_is_refused() -> None:
    """MQTT 5 §3.3.2.3.4: an alias must be named before it is used and lie within the
    Topic Alias Maximum we announced; the link then disconnects (0x94)."""
    from fieldchat.device.link import INBOUND_ALIASES, LinkConnection

    conn = LinkConnection(1, None, "5")  # type: ignore[arg-type]
    assert conn.inbound_topic("", 1) is None
    assert conn.inbound_topic("fc/v1/c/x/msg", 1) == "fc/v1/c/x/msg"
    assert conn.inbound_topic("", 1) == "fc/v1/c/x/msg"
    assert conn.inbound_topic("t", 0) is None
    assert conn.inbound_topic("t", INBOUND_ALIASES + 1) is None
