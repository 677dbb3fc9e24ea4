"""What a send costs in fsyncs, and what it survives (docs/device.md, Delivery model)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from device.chains import RESERVE_STEPS
from device.client import Device
from device.keystore import SEND_CHAIN_PREFIX
from device.state import DeviceState


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
    from device.client import Device
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
            state.add_outbox(db, "t", b"may leave before its fsync")
        assert not state.outbox_unsynced
        with state.transaction(durable=False, sync_outbox=False) as db:
            state.save({f"{SEND_CHAIN_PREFIX}cid": b"reservation"})
            state.add_outbox(db, "t", b"sealed under it")
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
    device.close()
    device = Device(tmp_path / "a.sqlite3")
    try:
        # Resumed past the renewed window: later steps only, never one of before.
        assert device.send(cid, "after restart").step == 2 * RESERVE_STEPS > max(steps)
    finally:
        device.close()
