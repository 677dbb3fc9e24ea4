"""What a send costs in fsyncs, and what it survives (docs/device.md, Delivery model)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fieldchat.device.chains import RESERVE_STEPS
from fieldchat.device.client import Device
from fieldchat.device.engine import Engine
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import SEND_CHAIN_PREFIX
from fieldchat.device.state import DeviceState
from fieldchat.schemas import KeyStoreError, Topics
from tests.device._mesh import text_of


def _offline(path: object, *, power_safe: bool = False) -> tuple[Device, str]:
    """A device never started (no link, no worker): its outbox only fills."""
    device = Device(path, power_safe=power_safe)  # type: ignore[arg-type]
    return device, device.create_conversation([])


def test_send_needs_an_fsync_only_per_reservation_unless_power_safe(tmp_path):
    device, cid = _offline(tmp_path / "a.sqlite3")
    before = device.state.fsyncs
    for i in range(2 * RESERVE_STEPS):
        device.send(cid, f"m{i}")
    assert device.state.fsyncs - before == 2  # one per chain reservation, not per message
    device.close()
    device, cid = _offline(tmp_path / "b.sqlite3", power_safe=True)
    before = device.state.fsyncs
    for i in range(10):
        device.send(cid, f"m{i}")
    assert device.state.fsyncs - before == 10
    device.close()


KILLED_SENDER = textwrap.dedent(
    """
    import os, signal, sys
    from fieldchat.device.client import Device
    device = Device(sys.argv[1])
    cid = device.conversations()[0].cid
    for i in range(int(sys.argv[2])):
        device.send(cid, f"m{i}")
    os.kill(os.getpid(), signal.SIGKILL)  # right after send() returned: nothing closed
    """
)


def test_what_send_returned_survives_a_sigkill_at_once(tmp_path):
    path = tmp_path / "a.sqlite3"
    device, cid = _offline(path)
    device.close()
    count = RESERVE_STEPS + 5  # crosses a reservation: both kinds of commit
    done = subprocess.run([sys.executable, "-c", KILLED_SENDER, str(path), str(count)], check=False)
    assert done.returncode == -signal.SIGKILL
    device = Device(path)
    try:
        assert [row.text for row in device.sent(cid)] == [f"m{i}" for i in range(count)]
        assert sum(row.what == "msg" for row in device.outbox()) == count
    finally:
        device.close()


def test_rows_sealed_under_an_unsynced_reservation_wait_for_its_fsync(tmp_path):
    state = DeviceState(tmp_path / "s.sqlite3")
    try:
        with state.transaction(durable=False, sync_outbox=False) as db:
            db.add_outbox("t", b"may leave before its fsync")
        assert not state.outbox_unsynced
        with state.transaction(durable=False, sync_outbox=False) as db:
            state.save({f"{SEND_CHAIN_PREFIX}cid": b"reservation"})
            db.add_outbox("t", b"sealed under it")
        assert state.reservation_unsynced
        assert state.outbox_unsynced  # the worker syncs before publishing (Device._pump)
        state.sync()
        assert not state.outbox_unsynced
        assert not state.reservation_unsynced
    finally:
        state.close()


def test_a_reservation_renewed_ahead_is_never_reused_after_a_restart(tmp_path):
    """The worker reserves a chain's next window before it runs out (Device._tick)."""
    device, cid = _offline(tmp_path / "a.sqlite3")
    left = RESERVE_STEPS // 2
    assert not device.engine.reservations_low(left)  # a chain not used yet is left alone
    steps = [device.send(cid, f"m{i}").step for i in range(RESERVE_STEPS - left + 1)]
    assert device.engine.reservations_low(left)
    with device.state.transaction(durable=False):
        assert device.engine.renew_reservations(left) == 1
    assert device.state.reservation_unsynced
    device.state.sync()
    assert not device.engine.reservations_low(left)
    device.state.close()  # as a crash: nothing more is written (no Device.close)
    device = Device(tmp_path / "a.sqlite3")
    try:
        # Resumed past the renewed window: later steps only, never one of before.
        assert device.send(cid, "after restart").step == 2 * RESERVE_STEPS > max(steps)
    finally:
        device.close()


def test_a_clean_close_resumes_at_the_first_unused_step(tmp_path):
    device, cid = _offline(tmp_path / "a.sqlite3")
    steps = [device.send(cid, f"m{i}").step for i in range(3)]
    device.close()
    device = Device(tmp_path / "a.sqlite3")
    try:
        assert device.send(cid, "after restart").step == max(steps) + 1
    finally:
        device.close()


def _fail_on(path: Path, text: str) -> None:
    """Make SQLite itself refuse the ``sent`` row of ``text`` (as a full disk would)."""
    db = sqlite3.connect(path)
    try:
        db.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON sent WHEN NEW.text = "
            f"'{text}' BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
        db.commit()
    finally:
        db.close()


def test_a_reservation_rolled_back_with_its_send_is_not_used(tmp_path):
    """A write failing after the reservation in one send transaction: memory rolls back
    with the disk, so no step is sealed twice after a restart (PROTOCOL.md §6.3)."""
    path = tmp_path / "a.sqlite3"
    peer = Engine(Identity.generate())
    device = Device(path)
    with device.state.transaction():
        device.engine.learn_bundle(peer.identity.bundle.to_bytes())
    peer.learn_bundle(device.engine.identity.bundle.to_bytes())
    cid = device.create_conversation([peer.pid])
    for row in device.outbox():  # the roster and the peer's grant, as the broker routes them
        if row.what == "roster":
            peer.handle_roster(row.payload)
        elif row.topic == Topics().inbox(peer.pid):
            peer.handle_grant(row.payload)
    device.send_many(cid, [f"a{i}" for i in range(RESERVE_STEPS)])  # steps 0..63: one window
    record = device.state.load(f"{SEND_CHAIN_PREFIX}{cid}")
    _fail_on(path, "boom")
    with pytest.raises(KeyStoreError, match="disk is full"):
        # The first text reserves steps 64..127 in the transaction, the second fails it.
        device.send_many(cid, ["rolled back", "boom"])
    assert device.state.load(f"{SEND_CHAIN_PREFIX}{cid}") == record
    texts = [f"b{i}" for i in range(10)]
    device.send_many(cid, texts)  # must reserve again, in its own transaction
    # A crash: the device is dropped without closing; only what committed remains.
    restarted = Device(path)
    try:
        texts += [f"c{i}" for i in range(RESERVE_STEPS + 10)]
        for text in texts[10:]:
            restarted.send(cid, text)
        rows = restarted.state._read("SELECT step, text, payload FROM sent ORDER BY id")
        steps = [step for step, _, _ in rows]
        assert len(set(steps)) == len(steps) == RESERVE_STEPS + len(texts)
        assert steps == sorted(steps)
        opened = [peer.open(cid, bytes(payload)) for _, _, payload in rows]
        assert [text_of(o) for o in opened if o is not None] == [
            f"a{i}" for i in range(RESERVE_STEPS)
        ] + texts
        assert [o.step for o in opened if o is not None] == steps
    finally:
        restarted.close()


def test_a_renewal_rolled_back_keeps_the_window_persisted(tmp_path):
    """The worker's renewal ahead of need (Device._tick), undone by a failing write."""
    path = tmp_path / "a.sqlite3"
    device, cid = _offline(path)
    left = RESERVE_STEPS // 2
    steps = [device.send(cid, f"m{i}").step for i in range(RESERVE_STEPS - left)]
    _fail_on(path, "boom")

    def renew_then_fail() -> None:
        with device.state.transaction(durable=False) as db:
            assert device.engine.renew_reservations(left) == 1
            db.add_sent(cid, 0, 0, 0, -1, "boom", "t", b"", 0)

    with pytest.raises(KeyStoreError, match="disk is full"):
        renew_then_fail()
    assert device.engine.reservations_low(left)  # still the window on disk
    # The rest of the persisted window, then a reservation of its own; then a crash.
    steps += [device.send(cid, f"n{i}").step for i in range(left + 1)]
    assert steps == list(range(RESERVE_STEPS + 1))
    restarted = Device(path)
    try:
        assert restarted.send(cid, "after restart").step == 2 * RESERVE_STEPS
    finally:
        restarted.close()


def test_own_envelopes_stay_until_archived_and_an_older_state_file_gains_the_column(tmp_path):
    """With a gateway, own envelopes are kept until the archive confirmed them (issue 14):
    the usual forgetting skips the unconfirmed; a state file from before the
    ``archived`` column opens with every kept envelope still to confirm."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE sent (id INTEGER PRIMARY KEY AUTOINCREMENT, cid TEXT NOT NULL,"
        " epoch INTEGER NOT NULL, sender_index INTEGER NOT NULL, chain INTEGER NOT NULL,"
        " step INTEGER NOT NULL, text TEXT NOT NULL, sent_at REAL NOT NULL,"
        " topic TEXT NOT NULL, payload BLOB, outbox_seq INTEGER NOT NULL, published_at REAL,"
        " UNIQUE (cid, epoch, chain, step));"
        "INSERT INTO sent VALUES (1, 'c', 0, 1, 0, 7, 'hi', 1.0, 't', x'01', 1, 10.0);"
    )
    db.commit()
    db.close()
    path.chmod(0o600)
    state = DeviceState(path)
    try:
        (row,) = state.unarchived(published_before=100.0, limit=10)
        assert (row.cid, row.sender_index, row.step, row.payload) == ("c", 1, 7, b"\x01")
        with state.transaction() as tx:
            tx.add_kept("c", (0, 1, 0, 8), "t", b"\x02", 2)
            tx.acknowledged([2], 11.0)
            assert tx.forget_old_payloads(50.0, keep_unarchived=True) == 0
            assert tx.prune_kept(50.0, keep_unarchived=True) == 0
        assert state.unarchived_count() == 2
        assert state.own_envelopes("c", (0, 1, 0), 0, 100, 10) == [
            (7, "t", b"\x01"),
            (8, "t", b"\x02"),
        ]
        assert state.own_high("c") == {(0, 1, 0): 8}
        with state.transaction() as tx:
            tx.mark_archived([("c", 0, 0, 7), ("c", 0, 0, 8)])
            assert tx.forget_old_payloads(50.0, keep_unarchived=True) == 1
            assert tx.prune_kept(50.0, keep_unarchived=True) == 1
        assert state.unarchived_count() == 0
        assert state.own_envelopes("c", (0, 1, 0), 0, 100, 10) == []
    finally:
        state.close()
