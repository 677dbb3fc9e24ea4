"""Authorization: the shared ACL table, membership learned from signed rosters,
admin overrides, and revocation reaching existing subscriptions."""

from __future__ import annotations

import time

from fieldchat.broker import BrokerThread, Store
from fieldchat.broker.testing import found_roster, next_roster, participant
from fieldchat.schemas.topics import Topics
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


# issue 13: rosters are proposed, retained state cannot be erased or misplaced -------


def _denied(broker: BrokerThread, reason: str) -> float:
    return broker.broker.metrics.value("fieldchat_broker_denials_total", reason=reason)


def _connected(broker, creds, peers, who, **kw) -> Peer:
    peer = Peer(broker.port, *creds[who], **kw)
    peers.append(peer)
    peer.connect()
    return peer


def test_a_proposal_becomes_the_retained_roster_and_reaches_only_gateways(broker_thread, peers):
    creds = world(broker_thread)
    gateway = _connected(broker_thread, creds, peers, "gateway")
    assert gateway.subscribe(T.all_proposals()) == 1
    assert gateway.subscribe(T.all_rosters()) == 1
    alice = _connected(broker_thread, creds, peers, "alice")
    assert alice.subscribe(T.propose(X)) == 128  # proposals are for the verifiers
    assert alice.publish(T.propose(X), ROSTER_X.to_bytes())  # epoch 0, no ACL lists X yet
    got = sorted((m.topic, m.payload) for m in gateway.expect(2))
    assert got == sorted([(T.propose(X), ROSTER_X.to_bytes()), (T.roster(X), ROSTER_X.to_bytes())])
    bob = _connected(broker_thread, creds, peers, "bob")
    assert bob.subscribe(T.roster(X)) == 1
    [retained] = bob.expect(1)
    assert (retained.payload, retained.retain) == (ROSTER_X.to_bytes(), True)
    # the next epoch reaches the roster's live subscribers, as if published retained
    epoch1 = next_roster(ROSTER_X, ALICE, [BOB, CAROL])
    assert alice.publish(T.propose(X), epoch1.to_bytes())
    assert [m.payload for m in bob.expect(1)] == [epoch1.to_bytes()]
    carol = _connected(broker_thread, creds, peers, "carol")
    assert carol.subscribe(T.msg(X)) == 1  # membership learned from the proposal
    # proposing the current roster again is an accepted no-op
    gateway.drain(0.3)
    assert alice.publish(T.propose(X), epoch1.to_bytes())
    assert bob.drain(0.4) == []
    assert [m.topic for m in gateway.drain(0.3)] == [T.propose(X)]
    assert not alice.disconnected.is_set()
    # persisted like a roster published on c/X/roster
    broker_thread.restart()
    late = Peer(broker_thread.port, *creds["carol"])
    peers.append(late)
    late.connect()
    assert late.subscribe(T.roster(X)) == 1
    assert [m.payload for m in late.expect(1)] == [epoch1.to_bytes()]


def test_a_failed_proposal_is_refused_counted_and_not_retained(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    gateway = _connected(broker_thread, creds, peers, "gateway")
    assert gateway.subscribe(T.all_proposals()) == 1
    bob = _connected(broker_thread, creds, peers, "bob")
    forged = next_roster(ROSTER_X, BOB, [BOB, CAROL])  # bob is a member, not an admin
    assert bob.publish(T.propose(X), forged.to_bytes())  # acknowledged (a race), dropped
    assert bob.publish(T.propose(X), b"")
    assert gateway.drain(0.5) == []
    assert bob.subscribe(T.roster(X)) == 1
    assert [m.payload for m in bob.expect(1)] == [ROSTER_X.to_bytes()]
    carol = _connected(broker_thread, creds, peers, "carol")
    assert carol.subscribe(T.msg(X)) == 128
    assert _denied(broker_thread, "roster") == 2


def test_retained_publish_on_inbox_or_msg_disconnects_and_keeps_nothing(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    for who, topic in (("carol", T.inbox(ALICE.pid)), ("bob", T.msg(X))):
        peer = _connected(broker_thread, creds, peers, who)
        assert not peer.publish(topic, b"\x00" * 100_000, retain=True)
        assert peer.disconnected.wait(5)
    alice = _connected(broker_thread, creds, peers, "alice")
    assert alice.subscribe(T.inbox(ALICE.pid)) == 1
    assert alice.subscribe(T.msg(X)) == 1
    assert alice.drain(0.5) == []  # nothing was retained for later subscribers
    assert _denied(broker_thread, "retained") == 2


def test_bundle_and_status_cannot_be_erased_or_oversized(broker_thread, peers):
    creds = world(broker_thread)
    alice = _connected(broker_thread, creds, peers, "alice")
    assert alice.publish(T.bundle(ALICE.pid), b"bundle", retain=True)
    assert alice.publish(T.status(ALICE.pid), b"online", retain=True)
    assert alice.publish(T.bundle(ALICE.pid), b"", retain=True)  # acknowledged, refused
    assert alice.publish(T.status(ALICE.pid), b"", retain=True)
    assert alice.publish(T.bundle(ALICE.pid), b"b" * (16 * 1024 + 1), retain=True)
    assert alice.publish(T.status(ALICE.pid), b"s" * 1025, retain=True)
    bob = _connected(broker_thread, creds, peers, "bob")
    assert bob.subscribe(T.bundle(ALICE.pid)) == 1
    assert bob.subscribe(T.status(ALICE.pid)) == 1
    assert sorted(m.payload for m in bob.drain(0.5)) == [b"bundle", b"online"]
    assert _denied(broker_thread, "empty_payload") == 2
    assert _denied(broker_thread, "payload_size") == 2


def test_conversations_founded_per_participant_are_limited(broker_thread, peers):
    creds = world(broker_thread)
    carol = _connected(broker_thread, creds, peers, "carol")
    rosters = [found_roster(CAROL, [ALICE], nonce=i.to_bytes(16, "big")) for i in range(102)]
    for roster in rosters[:101]:  # the attack founded 200 from one participant
        assert carol.publish(T.roster(roster.cid), roster.to_bytes(), retain=True)
    alice = _connected(broker_thread, creds, peers, "alice")
    assert alice.subscribe(T.msg(rosters[99].cid)) == 1
    assert alice.subscribe(T.msg(rosters[100].cid)) == 128
    assert _denied(broker_thread, "founding_quota") == 1
    broker_thread.restart()  # the window is stored
    carol = _connected(broker_thread, creds, peers, "carol")
    assert carol.publish(T.propose(rosters[101].cid), rosters[101].to_bytes())
    alice = _connected(broker_thread, creds, peers, "alice")
    assert alice.subscribe(T.msg(rosters[101].cid)) == 128
    assert alice.subscribe(T.msg(rosters[0].cid)) == 1


def test_will_of_a_removed_member_is_not_published(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    alice = _connected(broker_thread, creds, peers, "alice")
    assert alice.subscribe(T.msg(X)) == 1
    bob = _connected(broker_thread, creds, peers, "bob", will=(T.msg(X), b"bob's will", 1, False))
    assert alice.publish(T.roster(X), next_roster(ROSTER_X, ALICE, []).to_bytes(), retain=True)
    bob.drop()  # the will is due now, after bob's removal
    assert alice.drain(0.8) == []
    assert _denied(broker_thread, "will") == 1


def test_retained_wills_on_inbox_or_msg_and_roster_wills_are_refused(broker_thread, peers):
    creds = world(broker_thread)
    found(broker_thread, creds)
    wills = [
        (T.msg(X), b"kept forever", 1, True),
        (T.inbox(ALICE.pid), b"kept forever", 1, True),
        (T.roster(X), ROSTER_X.to_bytes(), 1, True),
    ]
    for will in wills:
        peer = Peer(broker_thread.port, *creds["bob"], will=will)
        peers.append(peer)
        accepted, code, _ = peer.connect(expect_ok=False)
        assert not accepted, will[0]
        assert code == 135  # paho's name for 3.1.1 return code 5, not authorized
    assert _denied(broker_thread, "will") == 3
