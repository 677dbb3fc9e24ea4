"""Authorization: the shared ACL table, membership learned from signed rosters,
admin overrides, and revocation reaching existing subscriptions."""

from __future__ import annotations

import time

from broker import Store
from broker.testing import found_roster, next_roster, participant
from schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL, ROSTER_X, X, run_cases
from tests.broker._peers import Peer

T = Topics()


def world(broker):
    return {
        "alice": (ALICE.pid, broker.enroll(ALICE.pid)),
        "bob": (BOB.pid, broker.enroll(BOB.pid)),
        "carol": (CAROL.pid, broker.enroll(CAROL.pid)),
        "gateway": broker.add_gateway("test"),
        "observer": broker.add_gateway("observer"),
    }


def found(broker, creds, roster=ROSTER_X, who="alice"):
    peer = Peer(broker.port, *creds[who])
    peer.connect()
    assert peer.publish(T.roster(roster.cid), roster.to_bytes(), retain=True)
    peer.disconnect()


def test_shared_acl_cases(broker_thread):
    creds = world(broker_thread)
    found(broker_thread, creds)
    assert run_cases(broker_thread.port, creds) == []


def test_forbidden_publish_disconnects_and_is_counted(broker_thread, peers):
    creds = world(broker_thread)
    carol = Peer(broker_thread.port, *creds["carol"])
    peers.append(carol)
    carol.connect()
    assert not carol.publish(T.bundle(ALICE.pid), b"forged bundle")
    assert carol.disconnected.wait(5)
    metrics = broker_thread.broker.metrics
    assert metrics.value("fieldchat_broker_denials_total", reason="not_owner") == 1


def test_not_member_publish_is_acknowledged_dropped_and_counted(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    bob = Peer(broker_thread.port, *creds["bob"])
    peers.append(bob)
    bob.connect()
    assert bob.subscribe(T.msg(X)) == 1
    carol = Peer(broker_thread.port, *creds["carol"])
    peers.append(carol)
    carol.connect()
    assert carol.publish(T.msg(X), b"not a member")  # acknowledged: no resend loop
    assert not carol.disconnected.is_set()
    assert bob.drain(0.5) == []
    metrics = broker_thread.broker.metrics
    assert metrics.value("fieldchat_broker_denials_total", reason="not_member") == 1


def test_roster_removal_cuts_existing_subscription_and_retained(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    bob = Peer(broker_thread.port, *creds["bob"], clean=False)
    peers.append(bob)
    bob.connect()
    assert bob.subscribe(T.msg(X)) == 1
    alice = Peer(broker_thread.port, *creds["alice"])
    peers.append(alice)
    alice.connect()
    assert alice.publish(T.msg(X), b"before")
    assert [m.payload for m in bob.expect(1)] == [b"before"]
    epoch1 = next_roster(ROSTER_X, ALICE, [])  # alice removes bob
    assert alice.publish(T.roster(X), epoch1.to_bytes(), retain=True)
    assert alice.publish(T.msg(X), b"after")
    assert bob.drain(0.5) == []  # the subscription made while a member is gone
    assert bob.subscribe(T.roster(X)) == 128  # and no retained roster either
    assert bob.subscribe(T.msg(X)) == 128
    assert bob.drain(0.3) == []


def test_rosters_must_chain(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    bob = Peer(broker_thread.port, *creds["bob"])
    peers.append(bob)
    bob.connect()
    # bob is a member but not an admin: his epoch 1 (removing alice) is refused
    forged = next_roster(ROSTER_X, BOB, [BOB, CAROL])
    assert bob.publish(T.roster(X), forged.to_bytes(), retain=True)
    carol = Peer(broker_thread.port, *creds["carol"])
    peers.append(carol)
    carol.connect()
    assert carol.subscribe(T.msg(X)) == 128
    # carol cannot claim a cid derived from alice's pid (only alice can sign it)
    mine = found_roster(CAROL, [CAROL], nonce=b"\x02" * 16)
    theirs = found_roster(ALICE, [], nonce=b"\x02" * 16).cid
    claim = mine.model_copy(update={"cid": theirs})
    assert carol.publish(T.roster(theirs), claim.to_bytes(), retain=True)
    assert carol.subscribe(T.msg(theirs)) == 128
    # the retained roster of X is still alice's epoch 0
    assert bob.subscribe(T.roster(X)) == 1
    [retained] = bob.expect(1)
    assert retained.payload == ROSTER_X.to_bytes()
    metrics = broker_thread.broker.metrics
    assert metrics.value("fieldchat_broker_denials_total", reason="roster") == 2


def test_new_conversation_needs_no_operator(broker_thread, peers):
    creds = world(broker_thread)
    dave = participant(4)
    creds["dave"] = (dave.pid, broker_thread.enroll(dave.pid))
    roster = found_roster(dave, [CAROL], nonce=b"\x05" * 16)
    found(broker_thread, creds, roster, who="dave")
    carol = Peer(broker_thread.port, *creds["carol"])
    peers.append(carol)
    carol.connect()
    assert carol.subscribe(T.roster(roster.cid)) == 1
    [retained] = carol.expect(1)
    assert retained.retain
    assert retained.payload == roster.to_bytes()


def test_deny_and_allow_overrides(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    bob = Peer(broker_thread.port, *creds["bob"])
    peers.append(bob)
    bob.connect()
    assert bob.subscribe(T.msg(X)) == 1
    broker_thread.deny(BOB.pid, X)
    alice = Peer(broker_thread.port, *creds["alice"])
    peers.append(alice)
    alice.connect()
    assert alice.publish(T.msg(X), b"bob is denied")
    assert bob.drain(0.5) == []
    broker_thread.allow(CAROL.pid, X)
    carol = Peer(broker_thread.port, *creds["carol"])
    peers.append(carol)
    carol.connect()
    assert carol.subscribe(T.msg(X)) == 1
    assert alice.publish(T.msg(X), b"carol is allowed")
    assert [m.payload for m in carol.expect(1)] == [b"carol is allowed"]


def test_override_from_another_process_takes_effect(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    bob = Peer(broker_thread.port, *creds["bob"])
    peers.append(bob)
    bob.connect()
    assert bob.subscribe(T.msg(X)) == 1
    with Store(broker_thread.config.db_path) as store:  # as `fieldchat broker deny` does
        store.deny(BOB.pid, X)
    alice = Peer(broker_thread.port, *creds["alice"])
    peers.append(alice)
    alice.connect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the broker polls the store every second
        alice.publish(T.msg(X), b"probe")
        if not bob.drain(0.3):
            break
    assert alice.publish(T.msg(X), b"denied now")
    assert bob.drain(0.5) == []
