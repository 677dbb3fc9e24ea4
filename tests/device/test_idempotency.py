"""Idempotency keys of sends (:mod:`fieldchat.device.idempotency`) on a real state file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldchat.device import idempotency
from fieldchat.device.client import Device
from fieldchat.schemas.errors import ConfigError, IdempotencyConflict


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _device(path: Path, clock: Clock) -> tuple[Device, str]:
    device = Device(path, clock=clock)
    cids = device.engine.conversations()
    cid = cids[0] if cids else device.create_conversation([])
    return device, cid


def test_a_key_queues_once_across_a_reopen(tmp_path: Path) -> None:
    clock = Clock()
    device, cid = _device(tmp_path / "d.sqlite3", clock)
    first = device.send(cid, "hello", idempotency_key="k1")
    again = device.send(cid, "hello", idempotency_key="k1")
    assert not first.replayed and again.replayed
    assert (again.id, again.step) == (first.id, first.step)
    device.close()
    device, cid = _device(tmp_path / "d.sqlite3", clock)
    try:
        assert device.send(cid, "hello", idempotency_key="k1").id == first.id
        other = device.send(cid, "hello", idempotency_key="k2")
        assert other.id != first.id and not other.replayed
        assert [r.text for r in device.sent(cid)] == ["hello", "hello"]
        with pytest.raises(IdempotencyConflict):
            device.send(cid, "changed", idempotency_key="k1")
        assert len(device.sent(cid)) == 2, "a conflicting retry queues nothing"
    finally:
        device.close()


def test_keys_are_forgotten_past_their_age_and_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    device, cid = _device(tmp_path / "d.sqlite3", clock)
    try:
        old = device.send(cid, "x", idempotency_key="old")
        clock.now += idempotency.MAX_AGE_S + 1
        assert device.send(cid, "x", idempotency_key="old").id != old.id  # a new send
        monkeypatch.setattr(idempotency, "MAX_KEYS", 3)
        for i in range(5):
            device.send(cid, "y", idempotency_key=f"n{i}")
        (count,) = device.state._read("SELECT COUNT(*) FROM sends_once")[0]
        assert count == 3
        assert device.send(cid, "y", idempotency_key="n4").replayed
        assert not device.send(cid, "y", idempotency_key="n0").replayed
    finally:
        device.close()


@pytest.mark.parametrize("key", ["", "k" * (idempotency.MAX_KEY_LENGTH + 1)])
def test_a_key_has_bounds(tmp_path: Path, key: str) -> None:
    device, cid = _device(tmp_path / "d.sqlite3", Clock())
    try:
        with pytest.raises(ConfigError, match="idempotency key"):
            device.send(cid, "x", idempotency_key=key)
        assert device.sent(cid) == []
    finally:
        device.close()
