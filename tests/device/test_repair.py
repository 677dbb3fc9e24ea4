"""Gap repair (PROTOCOL.md §4.1, MISSING receipts): a receiver that holds envelopes
behind a step the broker lost asks the sender at once, the sender publishes it again,
and the screen keeps the sender's order (issue 14, item 2).

The rules (when to ask, how much to answer) are pure and tested with a clock of our
own; the losses are real Mosquitto's: an offline session's queue overflowing, and
messages it acknowledged and then lost to a SIGKILL before its autosave.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fieldchat.device.client import Device
from fieldchat.device.config import LinkOptions
from fieldchat.device.events import Event, GapDetected, MessageReceived
from fieldchat.device.repair import (
    MAX_REPAIR_PER_INTERVAL,
    MAX_REPAIR_PER_REQUEST,
    REPAIR_INTERVAL_S,
    GapAsks,
    Repairs,
    lacking,
)
from tests.device.conftest import Devices, Embedded, Mosquitto, texts, wait_until

KEY = ("cid", 0, 1, 0)


# -- the rules ------------------------------------------------------------------------


def test_lacking_names_the_holes_below_what_is_held() -> None:
    assert lacking(4, [7]) == [(5, 6)]
    assert lacking(4, [5, 6]) == []
    assert lacking(4, [9, 6, 12]) == [(5, 5), (7, 8), (10, 11)]
    assert lacking(None, [3]) == []


def test_a_receiver_asks_at_once_then_three_times_within_the_window() -> None:
    asks = GapAsks(window_s=2.0)
    assert asks.lacking(KEY, top=9, now=100.0)  # a new episode: ask the archive too
    assert not asks.lacking(KEY, top=9, now=100.01)
    made = []
    t = 100.0
    while t < 104.0:
        if asks.due(t):
            made.append(round(t - 100.0, 2))
        t += 0.01
    # At once, then at w/8, 3w/8, 7w/8: every ask inside the 2 s window.
    assert made == [0.0, 0.25, 0.75, 1.75]
    assert asks.asks(KEY) == 4
    asks.settled(KEY)
    assert len(asks) == 0 and asks.due(200.0) == []


def test_a_new_loss_above_what_was_asked_starts_again_but_not_at_once_after_an_ask() -> None:
    asks = GapAsks(window_s=2.0)
    asks.lacking(KEY, top=9, now=0.0)
    assert asks.due(0.0) == [KEY]
    asks.lacking(KEY, top=20, now=0.1)  # steps 10..19 lost too
    assert asks.due(0.2) == []  # at most one ask per w/8
    assert asks.due(0.25) == [KEY]
    assert asks.asks(KEY) == 1  # the schedule started again from the new loss


def test_a_sender_answers_each_step_once_per_interval_and_within_bounds() -> None:
    repairs = Repairs(again_s=0.25)
    steps = [("c", 0, 0, 0, s) for s in range(3)]
    assert repairs.allow(steps, now=0.0) == steps
    # A second member asking for the same steps at once gets the copy already sent.
    assert repairs.allow(steps, now=0.1) == []
    assert repairs.allow(steps, now=0.3) == steps  # a later ask: the copy was lost too

    many = [("c", 0, 0, 0, s) for s in range(10_000)]
    first = repairs.allow(many, now=10.0)
    assert len(first) == MAX_REPAIR_PER_REQUEST
    total = len(first)
    for i in range(1, 20):
        total += len(repairs.allow(many[i * 300 :], now=10.0 + i * 0.01))
    assert total == MAX_REPAIR_PER_INTERVAL  # per REPAIR_INTERVAL_S, whoever asks
    assert repairs.allow(many[9_000:], now=10.0 + REPAIR_INTERVAL_S) != []
    assert repairs.refused > 0


# -- real losses on Mosquitto -----------------------------------------------------------

# The shipped reorder window and resend delay; quick reconnects.
DEFAULTS = LinkOptions(backoff_min_s=0.1, backoff_max_s=1.0, receipt_interval_s=0.2)


class _Archive:
    """A history source that serves what the test puts in it (the gateway's archive,
    minus the network: a plain ``since``, no reconciliation)."""

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self.asked: list[float] = []

    def since(
        self, cid: str, after: int, limit: int, *, from_epoch: int = 0
    ) -> tuple[list[bytes], int, bool]:
        self.asked.append(time.monotonic())
        return self.envelopes[after : after + limit], len(self.envelopes), False

    def rosters(self, cid: str, *, from_epoch: int = 0) -> list[bytes]:
        return []

    def deliveries(self, cid: str) -> list[bytes]:
        return []


def _talking(devices: Devices) -> tuple[Device, Device, str]:
    """Alice and Bob in a conversation, "hello" delivered and receipted; the resend a
    new member's grant brings is over, so only a gap request can repair a loss."""
    alice = devices.make("alice", link=DEFAULTS)
    bob = devices.make("bob", link=DEFAULTS)
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    alice.send(cid, "hello")
    wait_until(lambda: texts(bob, cid) == ["hello"], 10, "bob online")
    wait_until(lambda: alice.undelivered(cid) == 0, 10, "bob's receipt")
    wait_until(lambda: not alice._worker.outbound.resends.grants, 10, "the grant's resend")
    return alice, bob, cid


def _back(devices: Devices, bob: Device, history: _Archive | None = None) -> Device:
    """Bob's device again, after ``bob.close()`` and whatever the broker lost."""
    again = Device(
        bob.state.path, bob.broker, link=DEFAULTS, on_event=devices.events[bob.pid].append
    )
    again.history = history
    devices.open.append(again)
    again.start().wait_connected(10)
    return again


def _m2_dropped(devices: Devices) -> tuple[Device, Device, str, bytes]:
    """Bob offline behind a session that keeps one message: m1 waits, m2 is dropped,
    and Alice no longer keeps m2 (as a sender that forgot it): she cannot answer.
    Also m2's envelope, for an archive that got it."""
    alice, bob, cid = _talking(devices)
    bob.close()
    devices.open.remove(bob)
    for line in ("m1", "m2"):
        alice.send(cid, line)
        assert alice.wait_drained(10)
    ((m2,),) = alice.state._read("SELECT payload FROM sent WHERE text = 'm2'")
    with alice.state.transaction() as db:
        db.execute("UPDATE sent SET payload = NULL WHERE text = 'm2'")
    return alice, bob, cid, bytes(m2)


def _order_kept(device: Device, cid: str, expected: list[str], events: list[Event]) -> None:
    shown = [e for e in events if isinstance(e, MessageReceived) and e.cid == cid]
    assert [e.text for e in shown][-len(expected) :] == expected
    assert not [e for e in shown if e.late], "shown out of the sender's order"
    assert not [e for e in events if isinstance(e, GapDetected)]
    assert device.counters["reorder_gave_up"] == 0


@pytest.mark.mosquitto
def test_messages_an_overflowing_queue_dropped_are_asked_for_and_shown_in_order(
    tmp_path: Path,
) -> None:
    """Mosquitto drops what exceeds an offline session's ``max_queued_messages``; the
    sender never reconnects, so before gap requests the dropped messages were never
    published again: "after" was shown past them and they were lost."""
    broker = Mosquitto(tmp_path / "mosquitto", max_queued=10).start().verify_rosters()
    devices = Devices(tmp_path, broker)
    try:
        alice, bob, cid = _talking(devices)
        bob.close()  # clean: Mosquitto keeps his session and 10 messages of it
        devices.open.remove(bob)

        lines = [f"q{i:02d}" for i in range(30)]
        for line in lines:  # one PUBLISH each (a burst would leave as one frame)
            alice.send(cid, line)
            assert alice.wait_drained(10)
        events = devices.events[bob.pid]
        bob = _back(devices, bob)
        wait_until(lambda: len(texts(bob, cid)) == 11, 10, "the queue Mosquitto kept")
        assert texts(bob, cid) == ["hello", *lines[:10]]

        alice.send(cid, "after")  # reveals the 20 dropped ones as a gap
        expected = ["hello", *lines, "after"]
        wait_until(lambda: texts(bob, cid) == expected, 10, "the dropped ones, in order")
        _order_kept(bob, cid, [*lines, "after"], events)
        assert bob.counters["gap_requests_sent"] >= 1
        assert alice.counters["repaired"] >= 20
    finally:
        devices.close()
        broker.close()


@pytest.mark.mosquitto
def test_messages_mosquitto_acknowledged_then_lost_to_a_sigkill_are_shown_in_order(
    tmp_path: Path,
) -> None:
    """Issue 14: Mosquitto acknowledged messages and lost them (SIGKILL before its
    autosave). The sender published them again only ``resend_after_s`` (5 s) after
    reconnecting while the receiver held later ones for ``reorder_window_s`` (2 s): they
    were shown out of order. A gap request brings them at once."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.config.write_text(
        broker.config.read_text().replace("autosave_interval 1\n", "autosave_interval 3600\n")
    )
    broker.start().verify_rosters()
    devices = Devices(tmp_path, broker)
    try:
        alice, bob, cid = _talking(devices)
        broker.stop()  # a clean stop saves the sessions and subscriptions
        broker.start()
        for device in (alice, bob):
            device.wait_connected(15)
        time.sleep(0.5)  # their subscriptions are in place again
        bob.close()  # offline: what alice sends now waits in his session, in memory only
        devices.open.remove(bob)

        lines = [f"k{i}" for i in range(5)]
        for line in lines:
            alice.send(cid, line)
        assert alice.wait_drained(10)  # acknowledged by Mosquitto...
        broker.kill()  # ...and lost: no autosave since the start
        broker.start()
        alice.wait_connected(15)
        alice.send(cid, "after")  # long before alice's resend (resend_after_s = 5 s)
        assert alice.wait_drained(10)

        events = devices.events[bob.pid]
        bob = _back(devices, bob)
        expected = ["hello", *lines, "after"]
        wait_until(lambda: len(texts(bob, cid)) == len(expected), 15, "every message")
        assert texts(bob, cid) == expected
        _order_kept(bob, cid, [*lines, "after"], events)
        assert alice.counters["repaired"] >= len(lines)
    finally:
        devices.close()
        broker.close()


@pytest.mark.mosquitto
def test_a_gap_the_sender_cannot_answer_is_filled_from_the_archive_at_once(
    tmp_path: Path,
) -> None:
    """The sender no longer keeps the message a broker dropped (it went offline, or
    forgot it): nobody answers the MISSING receipt, but the receiver also starts a tail
    round at once and the archive has the lost message, shown in order. It used to be
    asked for only after ``gap_timeout_s``, long after the later message was shown."""
    broker = Mosquitto(tmp_path / "mosquitto", max_queued=1).start().verify_rosters()
    devices = Devices(tmp_path, broker)
    archive = _Archive()
    try:
        alice, bob, cid, m2 = _m2_dropped(devices)
        events = devices.events[bob.pid]
        bob = _back(devices, bob, archive)
        wait_until(lambda: texts(bob, cid) == ["hello", "m1"], 10, "the one Mosquitto kept")
        wait_until(lambda: bool(archive.asked), 10, "the round after connecting")
        wait_until(lambda: not bob._worker.rounds.tail.running, 10, "no round running")
        archive.envelopes.append(m2)  # archived (the gateway got it)
        asked = len(archive.asked)
        alice.send(cid, "m3")
        wait_until(lambda: texts(bob, cid) == ["hello", "m1", "m2", "m3"], 10, "m2 then m3")
        assert len(archive.asked) > asked  # asked at once, not after gap_timeout_s
        _order_kept(bob, cid, ["m1", "m2", "m3"], events)
    finally:
        devices.close()
        broker.close()


@pytest.mark.mosquitto
def test_a_gap_nobody_can_fill_is_given_up_loudly_after_the_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the sender (it no longer keeps the message) nor an archive can answer:
    the held message is shown when the reorder window ends, no later, and the device
    says so — a GapDetected event, ``reorder_gave_up``, a warning naming the window."""
    import logging

    broker = Mosquitto(tmp_path / "mosquitto", max_queued=1).start().verify_rosters()
    devices = Devices(tmp_path, broker)
    caplog.set_level(logging.WARNING, logger="fieldchat.device")
    try:
        alice, bob, cid, _ = _m2_dropped(devices)
        events = devices.events[bob.pid]
        bob = _back(devices, bob)
        wait_until(lambda: texts(bob, cid) == ["hello", "m1"], 10, "the one Mosquitto kept")
        sent = time.monotonic()
        alice.send(cid, "m3")
        wait_until(lambda: texts(bob, cid) == ["hello", "m1", "m3"], 10, "m3, past the gap")
        waited = time.monotonic() - sent
        assert DEFAULTS.reorder_window_s <= waited < DEFAULTS.reorder_window_s + 1.0
        gaps = [e for e in events if isinstance(e, GapDetected)]
        assert [(g.sender, g.first, g.last) for g in gaps] == [(alice.pid, 2, 2)]
        assert bob.counters["reorder_gave_up"] == 1
        assert bob.counters["gap_requests_sent"] == 4  # at 0, 1/8, 3/8 and 7/8 of it
        assert "after 2 s (reorder_window_s, 4 asks)" in caplog.text
    finally:
        devices.close()
        broker.close()


@pytest.mark.mosquitto
def test_a_gap_request_held_behind_a_gap_in_its_senders_chain_is_answered_at_once(
    tmp_path: Path,
) -> None:
    """The soak's out-of-order screens (issue 14): Bob's device crashed (its restart
    skips the steps it had reserved: a gap in his chain that nothing fills) and his
    broker dropped one of Alice's messages. His MISSING receipt, on his chain after
    that gap, was held by Alice for display order like any envelope, and answered
    only when her own reorder window gave up on his skipped steps — as late as his
    window, which then showed "m3" before "m2". Alice answers a gap request at once."""
    import sqlite3

    broker = Mosquitto(tmp_path / "mosquitto", max_queued=1).start().verify_rosters()
    devices = Devices(tmp_path, broker)
    try:
        alice, bob, cid = _talking(devices)
        bob.close()
        devices.open.remove(bob)
        with sqlite3.connect(bob.state.path) as db:  # a crash: nothing parked
            db.execute("DELETE FROM records WHERE key LIKE 'unused/%'")
        for line in ("m1", "m2"):  # m2 exceeds his offline queue: dropped
            alice.send(cid, line)
            assert alice.wait_drained(10)
        events = devices.events[bob.pid]
        bob = _back(devices, bob)
        wait_until(lambda: texts(bob, cid) == ["hello", "m1"], 10, "the one Mosquitto kept")
        alice.send(cid, "m3")
        wait_until(lambda: len(texts(bob, cid)) == 4, 10, "m2 and m3")
        assert texts(bob, cid) == ["hello", "m1", "m2", "m3"]
        _order_kept(bob, cid, ["m1", "m2", "m3"], events)
        assert alice.counters["gap_requests_answered_held"] >= 1
    finally:
        devices.close()
        broker.close()


def test_a_window_does_not_run_out_while_the_receiver_is_offline(tmp_path: Path) -> None:
    """The soak's scaled out-of-order screens (issue 14): with its broker link down,
    a receiver's history tail (HTTP) brought a later envelope, archived by a gateway
    before the earlier ones; the broker held the earlier ones in the receiver's
    session. The window ran out offline (no ask could be made) and the later one was
    shown first; the earlier ones came right after the connect. Now a window runs out
    offline only ``gap_timeout_s`` late, and each connect gives what is held a whole
    window more: the session's backlog comes in that window, and all is in order."""
    from tests.device._wire import Front

    embedded = Embedded(tmp_path / "embedded").start()
    devices = Devices(tmp_path, embedded)
    front = Front(embedded.port)
    archive = _Archive()
    try:
        alice = devices.make("alice", link=DEFAULTS)
        bob = devices.make("bob", link=DEFAULTS, port=front.port)
        bob.history = archive
        cid = alice.create_conversation([bob.pid])
        wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
        alice.send(cid, "hello")
        wait_until(lambda: texts(bob, cid) == ["hello"], 10, "bob online")
        wait_until(lambda: not alice._worker.outbound.resends.grants, 10, "the grant's resend")
        events = devices.events[bob.pid]

        port = front.port
        front.close()  # bob's link goes; his session keeps what alice sends now
        wait_until(lambda: not bob.connected, 10, "bob offline")
        for line in ("m1", "m2"):
            alice.send(cid, line)
            assert alice.wait_drained(10)
        ((m2,),) = alice.state._read("SELECT payload FROM sent WHERE text = 'm2'")
        archive.envelopes.append(bytes(m2))  # archived before m1 (another gateway)
        bob._worker.rounds.tail.soon(time.time())
        wait_until(
            lambda: bool(bob._worker.inbound.sequencer.waiting), 10, "m2 from the tail, held for m1"
        )
        time.sleep(DEFAULTS.reorder_window_s + 1.0)  # a whole window, offline
        assert texts(bob, cid) == ["hello"]

        front = Front(embedded.port, port=port)  # back: the session delivers m1
        wait_until(lambda: len(texts(bob, cid)) == 3, 15, "m1 and m2")
        assert texts(bob, cid) == ["hello", "m1", "m2"]
        _order_kept(bob, cid, ["m1", "m2"], events)
    finally:
        front.close()
        devices.close()
        embedded.close()
