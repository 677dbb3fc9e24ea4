"""The generated Mosquitto configuration enforces the same ACL cases as our broker."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fieldchat.broker import Store
from fieldchat.broker._mosquitto import write_mosquitto_config
from fieldchat.broker.testing import found_roster, next_roster
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL, ROSTER_X, X, run_cases
from tests.broker._peers import Peer

T = Topics()
MOSQUITTO = "/usr/sbin/mosquitto"
pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason="mosquitto is not installed"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def world(tmp_path: Path):
    with Store(tmp_path / "broker" / "broker.sqlite3") as store:
        creds = {
            "alice": (ALICE.pid, store.enroll(ALICE.pid)),
            "bob": (BOB.pid, store.enroll(BOB.pid)),
            "carol": (CAROL.pid, store.enroll(CAROL.pid)),
            "gateway": store.add_gateway("test"),
            "observer": store.add_gateway("observer"),
        }
        store.record_roster(ROSTER_X)  # as the embedded broker learned it
        port = _free_port()
        files = write_mosquitto_config(
            store, tmp_path / "mosquitto", port=port, user=getpass.getuser()
        )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(files.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, _ = proc.communicate()
                pytest.fail(f"mosquitto did not start: {out.decode()}")
            time.sleep(0.05)
    yield port, creds, files
    proc.terminate()
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def test_generated_files_are_private_and_hold_no_secret(world):
    _, creds, files = world
    assert files.passwd.stat().st_mode & 0o777 == 0o600
    assert files.acl.stat().st_mode & 0o777 == 0o600
    text = files.passwd.read_text() + files.acl.read_text() + files.conf.read_text()
    assert all(secret not in text for _, secret in creds.values())
    assert "use_username_as_clientid true" in files.conf.read_text()


def _retain_roster(port, creds, roster=ROSTER_X) -> None:
    """What the gateway does with a proposal that chains (Mosquitto cannot verify)."""
    gateway = Peer(port, *creds["gateway"])
    gateway.connect()
    assert gateway.publish(T.roster(roster.cid), roster.to_bytes(), retain=True)
    gateway.disconnect()


def test_same_acl_cases_pass_on_mosquitto(world):
    port, creds, _ = world
    _retain_roster(port, creds)
    failures = run_cases(port, creds, strict_suback=False)
    assert failures == [], "\n".join(failures)


def test_members_cannot_replace_or_erase_the_roster_but_can_propose(world):
    # Issue 13: on Mosquitto a member (not an admin) replaced the retained roster with
    # one it signed that listed an outsider; an empty payload would have erased it.
    port, creds, _ = world
    _retain_roster(port, creds)
    peers: list[Peer] = []

    def connect(who: str) -> Peer:
        peer = Peer(port, *creds[who])
        peers.append(peer)
        peer.connect()
        return peer

    try:
        observer = connect("observer")
        assert observer.subscribe(T.all_rosters()) != 128
        assert observer.subscribe(T.all_proposals()) != 128
        assert [m.payload for m in observer.expect(1)] == [ROSTER_X.to_bytes()]
        forged = next_roster(ROSTER_X, BOB, [BOB, CAROL])
        for who in ("bob", "alice"):  # not even the admin writes the retained roster
            peer = connect(who)
            assert peer.publish(T.roster(X), forged.to_bytes(), retain=True)
            assert peer.publish(T.roster(X), b"", retain=True)
        bob = connect("bob")
        bob.subscribe(T.propose(X))  # Mosquitto 2.0.11 grants it and delivers nothing
        assert bob.publish(T.propose(X), forged.to_bytes())  # a proposal: the gateway checks
        carol = connect("carol")
        new = found_roster(CAROL, [ALICE], nonce=b"\x09" * 16)
        assert carol.publish(T.propose(new.cid), new.to_bytes())  # no ACL lists it yet
        got = [(m.topic, m.payload) for m in observer.drain(0.8)]
        assert got == [(T.propose(X), forged.to_bytes()), (T.propose(new.cid), new.to_bytes())]
        assert bob.drain(0.2) == []
        late = connect("alice")
        assert late.subscribe(T.roster(X)) != 128
        assert [m.payload for m in late.expect(1)] == [ROSTER_X.to_bytes()]
        # the verifier's republish is what members see
        epoch1 = next_roster(ROSTER_X, ALICE, [BOB])
        _retain_roster(port, creds, epoch1)
        assert [m.payload for m in late.expect(1)] == [epoch1.to_bytes()]
    finally:
        for peer in peers:
            peer.close()


def test_wrong_password_is_refused_by_mosquitto(world):
    port, _, _ = world
    peer = Peer(port, ALICE.pid, "not the credential")
    try:
        assert not peer.connect(expect_ok=False)[0]
    finally:
        peer.close()
