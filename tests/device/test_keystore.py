"""The file-backed key store and the engine's persistence through it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from fieldchat.device.chains import RESERVE_STEPS
from fieldchat.device.engine import Engine
from fieldchat.device.keystore import SqliteKeyStore
from fieldchat.schemas import KeyStoreError, TextMessage
from fieldchat.schemas._codec import pack
from fieldchat.schemas.envelope import read_header
from tests.device._mesh import text_of


def test_store_file_is_private(tmp_path):
    path = tmp_path / "keys.db"
    store = SqliteKeyStore(path)
    store.save({"a": b"1"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for side in tmp_path.glob("keys.db-*"):
        assert stat.S_IMODE(side.stat().st_mode) == 0o600
    store.close()


def test_store_refuses_a_world_readable_file(tmp_path):
    path = tmp_path / "keys.db"
    path.touch()
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        SqliteKeyStore(path)


def test_save_is_atomic_and_deletes(tmp_path):
    store = SqliteKeyStore(tmp_path / "k.db")
    store.save({"x/1": b"a", "x/2": b"b", "y": b"c"})
    store.save({"x/1": None, "x/2": b"B"})
    assert store.load_prefix("x/") == {"x/2": b"B"}
    assert store.load("y") == b"c" and store.load("x/1") is None
    store.close()


def test_engine_state_survives_a_restart(tmp_path):
    alice = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    bob_store = SqliteKeyStore(tmp_path / "bob.db")
    bob = Engine.open_store(bob_store)
    alice.learn_bundle(bob.identity.bundle.to_bytes())
    bob.learn_bundle(alice.identity.bundle.to_bytes())
    cid, pubs = alice.create_conversation([bob.pid])
    for pub in pubs:
        if pub.topic.endswith("/propose"):
            for grant in bob.handle_roster(pub.payload):
                alice.handle_grant(grant.payload)
        else:
            bob.handle_grant(pub.payload)
    first = alice.seal(cid, TextMessage(sent_at=1, text="one"))
    assert text_of(bob.open(cid, first)) == "one"
    bob.flush()

    bob_again = Engine.open_store(SqliteKeyStore(tmp_path / "bob.db"))
    assert bob_again.pid == bob.pid and bob_again.conversations() == [cid]
    assert bob_again.open(cid, first) is None  # the flushed chain remembers step 0
    second = alice.seal(cid, TextMessage(sent_at=2, text="two"))
    assert text_of(bob_again.open(cid, second)) == "two"
    reply = bob_again.seal(cid, TextMessage(sent_at=3, text="back"))
    assert text_of(alice.open(cid, reply)) == "back"


CRASHING_SENDER = textwrap.dedent(
    """
    import os, sys
    from fieldchat.device.engine import Engine
    from fieldchat.device.keystore import SqliteKeyStore
    from fieldchat.schemas import TextMessage
    engine = Engine.open_store(SqliteKeyStore(sys.argv[1]))
    cid = engine.conversations()[0]
    count = int(sys.argv[2])
    for i in range(count):
        data = engine.seal(cid, TextMessage(sent_at=i, text=str(i)))
        sys.stdout.write(data.hex() + "\\n")
    sys.stdout.flush()
    os._exit(0)  # no flush, no close: as abrupt as a power cut after the writes
    """
)


def _pair_on_disk(tmp_path) -> tuple[Engine, Engine, str]:
    alice = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    bob = Engine.open_store(SqliteKeyStore(tmp_path / "bob.db"))
    alice.learn_bundle(bob.identity.bundle.to_bytes())
    bob.learn_bundle(alice.identity.bundle.to_bytes())
    cid, pubs = alice.create_conversation([bob.pid])
    for pub in pubs:
        if pub.topic.endswith("/propose"):
            bob.handle_roster(pub.payload)
        else:
            bob.handle_grant(pub.payload)
    return alice, bob, cid


def test_a_crashed_sender_never_reuses_a_step(tmp_path):
    """The reservation is persisted before the envelope leaves, so steps only move on."""
    alice, bob, cid = _pair_on_disk(tmp_path)
    del alice

    seen: set[int] = set()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for run, count in enumerate((5, RESERVE_STEPS + 3, 1, 20)):
        out = subprocess.run(
            [sys.executable, "-c", CRASHING_SENDER, str(tmp_path / "alice.db"), str(count)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=60,
        ).stdout.split()
        assert len(out) == count
        for line in out:
            data = bytes.fromhex(line)
            step = read_header(data)[5]
            assert step not in seen, f"step {step} reused after restart {run}"
            seen.add(step)
            assert bob.open(cid, data) is not None
    assert len(seen) == 5 + RESERVE_STEPS + 3 + 1 + 20


def _steps(engine: Engine, cid: str, count: int) -> list[int]:
    return [
        read_header(engine.seal(cid, TextMessage(sent_at=i, text=str(i))))[5] for i in range(count)
    ]


def test_a_parked_sender_resumes_at_its_first_unused_step(tmp_path):
    """A clean stop keeps the reserved steps: receivers see no jump after a restart."""
    alice, _, cid = _pair_on_disk(tmp_path)
    assert _steps(alice, cid, 5) == [0, 1, 2, 3, 4]
    assert alice.park() == 1
    with pytest.raises(KeyStoreError, match="parked"):
        alice.seal(cid, TextMessage(sent_at=9, text="too late"))

    again = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    assert _steps(again, cid, RESERVE_STEPS) == list(range(5, 5 + RESERVE_STEPS))
    # The record was consumed at load: a crash now resumes at the reservation, past
    # every step this run may have used, never at 5 again.
    assert not again.store.load_prefix("unused/")
    crashed = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    assert _steps(crashed, cid, 1) == [2 * RESERVE_STEPS]


def test_unused_steps_that_do_not_fit_the_reservation_are_ignored(tmp_path):
    alice, _, cid = _pair_on_disk(tmp_path)
    _steps(alice, cid, 3)
    alice.park()
    store = SqliteKeyStore(tmp_path / "alice.db")
    (key,) = store.load_prefix("unused/")
    store.save({key: pack((0, 0, 1, (b"k" * 32,)))})  # claims steps the disk never reserved
    store.close()

    again = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    assert _steps(again, cid, 1) == [RESERVE_STEPS]  # the reservation, as after a crash
    assert not again.store.load_prefix("unused/")
    again.park()
    again.store.save({key: b"\xc1 not msgpack"})  # a damaged record does not stop a start
    third = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    assert _steps(third, cid, 1) == [2 * RESERVE_STEPS]


def test_grants_waiting_for_their_roster_survive_a_restart(tmp_path):
    alice = Engine.open_store(SqliteKeyStore(tmp_path / "alice.db"))
    bob = Engine.open_store(SqliteKeyStore(tmp_path / "bob.db"))
    alice.learn_bundle(bob.identity.bundle.to_bytes())
    bob.learn_bundle(alice.identity.bundle.to_bytes())
    cid, pubs = alice.create_conversation([bob.pid])
    roster = next(p for p in pubs if p.topic.endswith("/propose"))
    grant = next(p for p in pubs if p.topic.endswith("/inbox"))
    assert bob.handle_grant(grant.payload).needs_roster
    del bob

    bob = Engine.open_store(SqliteKeyStore(tmp_path / "bob.db"))
    (joined,) = bob.handle_roster(roster.payload)  # the held delivery keyed the epoch
    assert alice.open(cid, joined.payload) is not None  # Bob's JOINED control (§6.6)
    sealed = alice.seal(cid, TextMessage(sent_at=1, text="after restart"))
    assert text_of(bob.open(cid, sealed)) == "after restart"
    assert not bob.store.load_prefix("pending/")
