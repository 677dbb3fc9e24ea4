"""Nobody trusts a roster that does not chain to epoch 0 (issue 13, item 2; PROTOCOL.md §5.2).

The attacks: a non-admin member replaced the retained roster with one it signed that
listed an outsider, and the invited member accepted it and granted its chain key to
the outsider; a member more than one epoch behind accepted a roster signed by an
admin of its own (outdated) roster without the epochs between.

The attack tests import only what the code before the fix had, so on that code they
fail at their assertions (the forged roster is taken, Mallory gets a grant).
"""

from __future__ import annotations

import random

import pytest

from fieldchat.device import engine as engine_module
from fieldchat.device.engine import Engine, Publication
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import MemoryKeyStore
from fieldchat.schemas import (
    FieldchatError,
    Member,
    Policy,
    Roster,
    RosterRejected,
    TextMessage,
    TopicKind,
    Topics,
)
from fieldchat.schemas.kinds import ObjectKind
from tests.device._mesh import Mesh, text_of

TOPICS = Topics()


def text(s: str) -> TextMessage:
    return TextMessage(sent_at=1, text=s)


def kinds(pubs: list[Publication]) -> list[TopicKind]:
    return [TOPICS.parse(p.topic).kind for p in pubs]


def forged(signer: Engine, base: Roster, *members: Engine, epoch: int | None = None) -> Roster:
    """A roster ``signer`` signs on top of ``base``, listing ``members``, itself as admin."""
    return Roster.create(
        cid=base.cid,
        epoch=base.epoch + 1 if epoch is None else epoch,
        nonce=b"",
        prev=base.digest(),
        members=tuple(Member(key=m.identity.public, admin=m is signer, pq=True) for m in members),
        policy=base.policy,
        issued_at=2_000_000_000,
        signer_key=signer.identity.public,
        commit=bytes(32),
        sign=signer.identity.sign,
    )


def is_roster(data: bytes) -> bool:
    return data[1] == ObjectKind.ROSTER


def grants_to(pubs: list[Publication], engine: Engine) -> list[Publication]:
    return [p for p in pubs if p.topic == TOPICS.inbox(engine.pid) and not is_roster(p.payload)]


def take(engine: Engine, data: bytes) -> list[Publication]:
    """``engine.handle_roster``: its grants, or none when it holds the roster back."""
    try:
        return engine.handle_roster(data)
    except FieldchatError as exc:
        reason = exc.reason
    assert reason == "roster_pending"
    return []


def pending(engine: Engine, data: bytes) -> FieldchatError:
    with pytest.raises(FieldchatError) as info:
        engine.handle_roster(data)
    assert info.value.reason == "roster_pending"
    return info.value


def test_an_invited_member_refuses_a_roster_a_non_admin_signed_and_grants_nothing():
    """Bob (a member, no admin) replaces the retained roster with one listing Mallory;
    Carol, just invited, must neither trust it nor send Mallory anything."""
    mesh = Mesh("alice", "bob", "carol", "mallory")
    alice, bob, carol, mallory = (mesh[n] for n in ("alice", "bob", "carol", "mallory"))
    cid, pubs = alice.create_conversation([bob.pid])
    mesh.deliver([p for p in pubs if p.topic != TOPICS.inbox(carol.pid)])
    invite = alice.add_members(cid, [carol.pid])
    roster1 = Roster.from_bytes(invite[0].payload)
    evil = forged(bob, roster1, bob, carol, mallory)

    # The forged roster reaches Carol first (the retained roster it replaced).
    replies = take(carol, evil.to_bytes())
    assert grants_to(replies, mallory) == []
    assert not carol.is_member(cid)
    # Then what Alice sent her: the earlier roster in her inbox, her grant, roster 1.
    for pub in invite:
        topic = TOPICS.parse(pub.topic)
        if topic.kind is TopicKind.PROPOSE or (topic.pid == carol.pid and is_roster(pub.payload)):
            replies += take(carol, pub.payload)
        elif topic.pid == carol.pid:
            carol.handle_grant(pub.payload)
    assert carol.roster(cid) == roster1  # the forged epoch 2 did not chain: dropped
    assert mallory.pid not in carol.roster(cid).pids
    assert replies == []  # v2: only the admin who signs an epoch delivers its secret
    assert text_of(carol.open(cid, alice.seal(cid, text("hi")))) == "hi"  # keyed by Alice
    assert carol.counters["roster"] >= 1  # the held forgery, refused once its turn came
    assert carol.awaiting_rosters() == {}


def test_a_roster_that_does_not_chain_is_refused_even_as_the_first_one_seen():
    mesh = Mesh("alice", "bob", "mallory")
    alice, bob, mallory = mesh["alice"], mesh["bob"], mesh["mallory"]
    cid, pubs = alice.create_conversation([bob.pid])
    roster0 = Roster.from_bytes(pubs[0].payload)
    # Mallory signs an "epoch 1" on top of the real epoch 0, listing Bob and herself.
    replies = take(bob, forged(mallory, roster0, mallory, bob).to_bytes())
    assert grants_to(replies, mallory) == []
    assert not bob.is_member(cid)
    assert bob.handle_roster(roster0.to_bytes()) == []  # epoch 0 chains: adopted
    assert bob.roster(cid) == roster0 and bob.awaiting_rosters() == {}
    assert bob.is_member(cid)
    with pytest.raises(RosterRejected):  # as the next epoch, its signer is no admin
        bob.handle_roster(forged(mallory, roster0, mallory, bob).to_bytes())


def test_a_member_epochs_behind_needs_every_roster_between():
    """Dave, an admin at epoch 0 removed at epoch 1, signs an epoch 2 listing Mallory.
    Bob, still at epoch 0 where Dave was an admin, must not take it."""
    mesh = Mesh("alice", "bob", "dave", "mallory")
    alice, bob, dave, mallory = (mesh[n] for n in ("alice", "bob", "dave", "mallory"))
    cid, pubs = alice.create_conversation([bob.pid, dave.pid], admins=[dave.pid])
    mesh.deliver(pubs)
    removal = alice.remove_members(cid, [dave.pid])  # Bob is offline: he misses it
    roster1 = Roster.from_bytes(removal[0].payload)
    evil = forged(dave, roster1, dave, bob, mallory)
    replies = take(bob, evil.to_bytes())
    assert grants_to(replies, mallory) == []
    assert bob.roster(cid).epoch == 0
    replies = take(bob, roster1.to_bytes())  # the missing epoch arrives
    assert bob.roster(cid) == roster1
    assert grants_to(replies, mallory) == [] and grants_to(replies, dave) == []
    assert bob.counters["roster"] == 1  # the forged epoch 2, refused against epoch 1


def test_rosters_arriving_in_any_order_are_adopted_once_they_chain():
    mesh = Mesh("alice", "bob", "carol")
    alice, bob, carol = mesh["alice"], mesh["bob"], mesh["carol"]
    cid, pubs = alice.create_conversation([bob.pid])
    rosters = [pubs[0].payload]
    for policy in (Policy(pad=True), Policy(compress=True)):
        rosters.append(alice.set_policy(cid, policy)[0].payload)
    invite = alice.add_members(cid, [carol.pid])
    rosters.append(invite[0].payload)
    grant = next(p for p in grants_to(invite, carol))
    assert carol.handle_grant(grant.payload).needs_roster
    order = [3, *random.Random(7).sample([1, 2], 2), 0]
    for i in order:
        if i != 0:  # nothing granted before the chain from epoch 0 is verified
            error = pending(carol, rosters[i])
            assert (error.cid, error.have) == (cid, -1)  # type: ignore[attr-defined]
        else:
            replies = carol.handle_roster(rosters[i])
    assert carol.roster(cid).epoch == 3 and carol.is_member(cid)
    # Only the admin who signed the epoch delivers anything; Carol, new, says she listens.
    assert [TOPICS.parse(p.topic).kind for p in replies] == [TopicKind.MSG]
    # The held delivery was applied once the epoch was entered.
    assert text_of(carol.open(cid, alice.seal(cid, text("welcome")))) == "welcome"


def test_an_admin_sends_the_earlier_rosters_to_each_new_member_only():
    mesh = Mesh("alice", "bob", "carol", "dave")
    alice, bob, carol, dave = (mesh[n] for n in ("alice", "bob", "carol", "dave"))
    cid = mesh.create("alice", "bob")
    mesh.deliver(alice.set_policy(cid, Policy(pad=True)))
    pubs = alice.add_members(cid, [carol.pid, dave.pid])
    assert kinds(pubs)[0] is TopicKind.PROPOSE and not pubs[0].retain
    for member, expected in ((carol, 2), (dave, 2), (bob, 0)):
        inbox = [p for p in pubs if p.topic == TOPICS.inbox(member.pid) and is_roster(p.payload)]
        assert [Roster.from_bytes(p.payload).epoch for p in inbox] == list(range(expected))
        assert all(p.payload[1] == ObjectKind.ROSTER and not p.retain for p in inbox)
    # Delivered (the mesh routes inbox rosters to handle_inbox), both join at epoch 2.
    mesh.deliver(pubs)
    assert carol.roster(cid).epoch == dave.roster(cid).epoch == 2


def test_a_new_roster_is_proposed_not_written_to_the_retained_topic():
    mesh = Mesh("alice", "bob")
    cid, pubs = mesh["alice"].create_conversation([mesh["bob"].pid])
    assert pubs[0].topic == TOPICS.propose(cid) and not pubs[0].retain
    assert TopicKind.ROSTER not in kinds(pubs)
    assert not any(p.retain for p in mesh["alice"].remove_members(cid, [mesh["bob"].pid]))


def test_held_rosters_survive_a_restart_and_are_adopted_when_the_gap_fills():
    mesh = Mesh("alice", "bob")
    alice = mesh["alice"]
    cid, pubs = alice.create_conversation()
    rosters = [pubs[0].payload, alice.add_members(cid, [mesh["bob"].pid])[0].payload]
    store = MemoryKeyStore()
    bob = Engine(mesh["bob"].identity, store=store)
    bob.learn_bundle(alice.identity.bundle.to_bytes())
    pending(bob, rosters[1])
    again = Engine(mesh["bob"].identity, store=store)
    assert again.awaiting_rosters() == {cid: -1}
    again.handle_roster(rosters[0])  # epoch 0, then the held epoch 1: joined
    assert again.roster(cid).epoch == 1 and again.is_member(cid) and again.awaiting_rosters() == {}
    assert not store.load_prefix("rosterpool/")


def test_held_rosters_and_joining_conversations_are_bounded():
    mesh = Mesh("alice", "bob")
    alice, bob = mesh["alice"], mesh["bob"]
    cid, pubs = alice.create_conversation([bob.pid])
    roster0 = Roster.from_bytes(pubs[0].payload)
    limit = engine_module.MAX_ROSTER_CANDIDATES
    for i in range(limit + 3):  # far epochs that never chain
        pending(bob, forged(alice, roster0, alice, bob, epoch=5 + i).to_bytes())
    assert len(bob._convs[cid].candidates) == limit
    assert bob.counters["roster_pool_evicted"] == 3
    for _ in range(engine_module.MAX_JOINING + 2):  # conversations invented to fill our state
        other = Engine(Identity.generate())
        _, made = other.create_conversation()
        bob.handle_roster(made[0].payload)
    assert sum(c.epoch < 0 for c in bob._convs.values()) == engine_module.MAX_JOINING
    assert bob.counters["joining_evicted"] == 3
