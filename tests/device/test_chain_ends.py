"""A removed member cannot pass off unsigned old-epoch messages as a remaining member's
(issue 13, item 4; PROTOCOL.md §6.4, §7).

A member removed at epoch e+1 still holds every chain key of epoch e. Without a
signature, an envelope of epoch e proves only that its author held that key. Each
remaining sender states, in a signed ENDS control of the new epoch, where its epoch-e
chain ended; receivers then take unsigned epoch-e steps only below that end.
The attack test imports only what the code before the fix had.
"""

from __future__ import annotations

import pytest

from fieldchat.device.chains import step_keys
from fieldchat.device.engine import Engine
from fieldchat.device.keystore import MemoryKeyStore
from fieldchat.schemas import (
    Control,
    ControlOp,
    FieldchatError,
    MissingKey,
    Policy,
    TextMessage,
    Topics,
)
from fieldchat.schemas.crypto import aead_seal
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes, read_header
from fieldchat.schemas.grant import ChainEnd
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.messages import encode_plaintext
from tests.device._mesh import Mesh, text_of
from tests.device.test_coverage import forge_as as forge_in_epoch

TOPICS = Topics()


def text(s: str) -> TextMessage:
    return TextMessage(sent_at=1, text=s)


def forge_as(removed: Engine, cid: str, sender: Engine, step: int, words: str) -> bytes:
    """An unsigned epoch-0 envelope in ``sender``'s name, sealed by ``removed`` with the
    chain key of ``sender`` it kept (it opened ``sender``'s messages until removed)."""
    conv = removed._convs[cid]
    index = conv.rosters[0].index_of(sender.pid)
    chain = conv.recv[(0, index, 0)]
    ck = chain.key
    for _ in range(step - chain.step):
        ck = step_keys(ck)[1]
    header = header_bytes(EnvelopeKind.TEXT, 0, index, 0, step, signed=False)
    plaintext, _, _ = encode_plaintext(text(words))
    return header + aead_seal(
        step_keys(ck)[0], step.to_bytes(12, "big"), plaintext, header + decode_id(cid)
    )


def reason_of(engine: Engine, cid: str, envelope: bytes) -> str:
    with pytest.raises(FieldchatError) as info:
        engine.open(cid, envelope)
    return info.value.reason


def test_a_removed_member_cannot_forge_unsigned_messages_of_a_remaining_one():
    mesh = Mesh("alice", "bob", "carol")
    alice, bob, carol = mesh["alice"], mesh["bob"], mesh["carol"]
    cid = mesh.create("alice", "bob", "carol", sign_every=0)
    first = bob.seal(cid, text("b0"))
    assert text_of(alice.open(cid, first)) == text_of(carol.open(cid, first)) == "b0"
    late = bob.seal(cid, text("b1, sealed before the rotation, delivered after"))

    mesh.deliver(alice.remove_members(cid, [carol.pid]))
    assert not carol.is_member(cid)
    # Bob's steps: 0 his JOINED control (§6.6), 1 "b0", 2 "b1".
    forgery = forge_as(carol, cid, bob, 3, "from bob: pay Carol")

    assert text_of(alice.open(cid, late)).startswith("b1")  # sealed by Bob: fine
    assert reason_of(alice, cid, forgery) == "chain_closed"  # Bob never sealed step 3
    assert alice.counters["chain_closed"] == 1
    assert alice.open(cid, forge_as(carol, cid, bob, 2, "again")) is None  # step 2: taken
    # Signed envelopes and the new epoch are unaffected.
    assert text_of(alice.open(cid, bob.seal(cid, text("epoch 1")))) == "epoch 1"


def test_an_old_unsigned_envelope_waits_for_its_senders_end_then_opens():
    mesh = Mesh("alice", "bob", "carol", "dave")
    alice, bob, carol, dave = (mesh[n] for n in ("alice", "bob", "carol", "dave"))
    cid = mesh.create("alice", "bob", "carol", "dave", sign_every=0)
    late = bob.seal(cid, text("late"))
    pubs = alice.remove_members(cid, [carol.pid])
    roster = pubs[0].payload
    for engine in (bob, carol, dave):
        engine.handle_roster(roster)
    deliveries = {p.topic: p.payload for p in pubs[1:]}
    (ends,) = bob.handle_grant(deliveries[TOPICS.inbox(bob.pid)]).publications
    assert dave.handle_grant(deliveries[TOPICS.inbox(dave.pid)]).installed
    forgery = forge_as(carol, cid, bob, 2, "forged")  # 0: Bob's JOINED, 1: "late"

    # Bob's ENDS control of epoch 1 (his epoch-0 end) has not reached Dave yet.
    for envelope in (late, forgery):
        with pytest.raises(MissingKey) as info:  # held by the device, retried later
            dave.open(cid, envelope)
        assert info.value.reason == "chain_end_unknown"
    assert ends.topic == TOPICS.msg(cid)
    dave.open(cid, ends.payload)
    assert dave._convs[cid].ends == {(0, 1, 0): 2}
    assert text_of(dave.open(cid, late)) == "late"
    assert reason_of(dave, cid, forgery) == "chain_closed"


def test_an_unsigned_ends_control_is_not_taken():
    """Any member of the new epoch holds the new chains: without its sender's signature
    an ENDS control could state another member's end (PROTOCOL.md §6.5)."""
    mesh = Mesh("alice", "bob", "carol")
    alice, bob = mesh["alice"], mesh["bob"]
    cid = mesh.create("alice", "bob", "carol", sign_every=0)
    pubs = alice.remove_members(cid, [mesh["carol"].pid])
    alice_ends = [p for p in pubs if p.topic == TOPICS.msg(cid)]
    assert len(alice_ends) == 1
    assert read_header(alice_ends[0].payload).signed  # always signed, whatever the policy
    bob.handle_roster(pubs[0].payload)
    bob.handle_grant(next(p.payload for p in pubs if p.topic == TOPICS.inbox(bob.pid)))
    # Alice's own controls are always signed: Bob seals one at her next step with the
    # chain key of hers he holds, as a member could.
    forged_ends = Control(op=ControlOp.ENDS, ends=(ChainEnd(epoch=0, chain=0, next_step=9),))
    unsigned = forge_in_epoch(bob, cid, alice, 1, forged_ends)
    assert not read_header(unsigned).signed
    bob.open(cid, unsigned)
    assert bob._convs[cid].ends == {}
    assert bob.counters["unsigned_control"] == 1
    bob.open(cid, alice_ends[0].payload)
    assert bob._convs[cid].ends == {(0, 0, 0): 0}


def test_without_a_removal_old_unsigned_envelopes_need_no_end():
    mesh = Mesh("alice", "bob", "carol")
    alice, bob = mesh["alice"], mesh["bob"]
    cid = mesh.create("alice", "bob", "carol", sign_every=0)
    late = bob.seal(cid, text("late"))
    pubs = alice.set_policy(cid, Policy(sign_every=0, pad=True))
    alice.handle_roster(pubs[0].payload)  # (its own: a duplicate)
    assert text_of(alice.open(cid, late)) == "late"  # before any grant of Bob's


def test_signed_old_envelopes_need_no_end():
    mesh = Mesh("alice", "bob", "carol", "dave")
    alice, bob, carol, dave = (mesh[n] for n in ("alice", "bob", "carol", "dave"))
    cid = mesh.create("alice", "bob", "carol", "dave")
    late = bob.seal(cid, text("signed"))
    roster = alice.remove_members(cid, [carol.pid])[0].payload
    dave.handle_roster(roster)  # no grant from Bob yet
    assert text_of(dave.open(cid, late)) == "signed"


def test_stated_ends_survive_a_restart_and_cover_steps_a_crash_may_have_used():
    mesh = Mesh("alice", "bob", "carol")
    stores = {"alice": MemoryKeyStore(), "bob": MemoryKeyStore()}

    def restart(name: str) -> Engine:
        engine = mesh.engines[name] = Engine(mesh[name].identity, store=stores[name])
        for other in mesh.engines.values():
            engine.learn_bundle(other.identity.bundle.to_bytes())
        return engine

    alice, bob, carol = restart("alice"), restart("bob"), mesh["carol"]
    cid = mesh.create("alice", "bob", "carol", sign_every=0)
    for i in range(3):
        alice.open(cid, bob.seal(cid, text(str(i))))
    bob = restart("bob")  # a crash: Bob resumes at his reservation, step 64 (§6.3)
    mesh.deliver(alice.remove_members(cid, [carol.pid]))
    assert [(e.epoch, e.next_step) for e in restart("bob")._convs[cid].sent_ends] == [(0, 64)]
    genuine = forge_as(carol, cid, bob, 3, "Bob may have sealed step 3 before the crash")
    assert restart("alice").open(cid, genuine) is not None
    assert reason_of(mesh["alice"], cid, forge_as(carol, cid, bob, 64, "x")) == "chain_closed"
