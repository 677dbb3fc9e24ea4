"""The device on MQTT 5 against the embedded broker on loopback (issue 17, device side):
a refused publish is surfaced and not resent, topic aliases, No Local, and the fall
back to 3.1.1 on a broker that refuses 5."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldchat.device.client import Device
from fieldchat.device.events import PublishRefused
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
    wait_until(lambda: _refusals(on_embedded, alice.pid), 10, "the refusal")
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
        wait_until(lambda c=connects: alice.counters["connects"] > c and alice.connected, 10)
        wait_until(lambda: alice._resend is None, FAST.resend_after_s + 5, "the resend round")
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
    wait_until(lambda: _refusals(on_embedded, carol.pid), 10, "the refusal")
    (refused,) = _refusals(on_embedded, carol.pid)
    assert (refused.cid, refused.code) == (cid, NOT_AUTHORIZED)
    assert carol.wait_drained(5)
    assert carol._link is not None
    connects = carol.counters["connects"]
    carol._link.kick()
    wait_until(lambda: carol.counters["connects"] > connects and carol.connected, 10)
    wait_until(lambda: carol._resend is None, FAST.resend_after_s + 5, "the resend round")
    assert carol.wait_drained(5)
    assert carol.counters["refused_by_broker"] == 1
    assert "written after my removal" not in texts(alice, cid) + texts(bob, cid)
