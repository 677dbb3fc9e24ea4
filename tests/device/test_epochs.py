"""Protocol v2 (issue 16, items 1-3): epoch secrets delivered by the signing admin,
rotating prekeys, updates (PROTOCOL.md §2.5, §5.3, §6.1, §6.6-§6.7, §7).

Each test plays the attacker with real keys and real engines: a removed member, a
thief of a member's state after its prekey rotated, a thief holding a copy of a
member's whole state before it updated, a member that forges a delivery.
"""

from __future__ import annotations

import pytest

from fieldchat.device.engine import UPDATE_EPOCH_EVERY_S, Engine, Publication
from fieldchat.device.epochs import make_delivery, open_delivery
from fieldchat.device.identity import (
    MAX_OLD_PREKEYS,
    PREKEY_GRACE_S,
    PREKEY_MAX_OPENS,
    PREKEY_ROTATE_S,
    Identity,
)
from fieldchat.device.keystore import MemoryKeyStore
from fieldchat.device.sealing import Sealed, open_from_prekey
from fieldchat.schemas import (
    CryptoError,
    FieldchatError,
    GrantRejected,
    Policy,
    TextMessage,
    TopicKind,
    Topics,
    crypto,
)
from fieldchat.schemas.delivery import Delivery, is_delivery
from fieldchat.schemas.errors import EpochKeyPending, PrekeyUnknown
from fieldchat.schemas.ids import decode_id
from tests.device._mesh import Mesh, text_of

TOPICS = Topics()


def text(s: str) -> TextMessage:
    return TextMessage(sent_at=1, text=s)


def stolen(store: MemoryKeyStore) -> Identity:
    """The identity record in ``store``, as a thief copying it would have it."""
    record = store.load("identity")
    assert record is not None
    return Identity.from_secret_bytes(record)


def deliveries_to(pubs: list[Publication], engine: Engine) -> list[bytes]:
    return [
        p.payload for p in pubs if p.topic == TOPICS.inbox(engine.pid) and is_delivery(p.payload)
    ]


def readable(engine: Engine, cid: str, envelope: bytes) -> str | None:
    """What ``engine`` can read of ``envelope``: its text, or None if it cannot open it."""
    try:
        opened = engine.open(cid, envelope)
    except FieldchatError:
        return None
    return None if opened is None else text_of(opened)


def test_a_change_costs_one_delivery_per_other_member_and_nothing_else():
    mesh = Mesh("alice", "bob", "carol", "dave")
    alice = mesh["alice"]
    cid = mesh.create("alice", "bob", "carol")
    pubs = alice.add_members(cid, [mesh["dave"].pid])
    kinds = [TOPICS.parse(p.topic).kind for p in pubs]
    # The roster, the earlier roster to Dave's inbox, one delivery to each other member.
    assert kinds.count(TopicKind.PROPOSE) == 1
    assert sum(is_delivery(p.payload) for p in pubs) == 3
    assert len(pubs) == 1 + 1 + 3
    replies: list[Publication] = []
    for name in ("bob", "carol", "dave"):
        engine = mesh[name]
        for pub in pubs:
            topic = TOPICS.parse(pub.topic)
            if topic.kind is TopicKind.PROPOSE or (
                topic.pid == engine.pid and not is_delivery(pub.payload)
            ):
                replies += engine.handle_roster(pub.payload)
        for data in deliveries_to(pubs, engine):
            assert engine.handle_grant(data).installed
    assert replies == []  # the members send nothing back (default policy: no ENDS due)
    sealed = mesh["dave"].seal(cid, text("dave here"))
    assert {readable(mesh[n], cid, sealed) for n in ("alice", "bob", "carol")} == {"dave here"}


def test_removed_member_reads_nothing_new():
    mesh = Mesh("alice", "bob", "carol")
    alice, bob, carol = mesh["alice"], mesh["bob"], mesh["carol"]
    cid = mesh.create("alice", "bob", "carol")
    before = bob.seal(cid, text("before"))
    assert readable(carol, cid, before) == "before"
    pubs = alice.remove_members(cid, [carol.pid])
    assert deliveries_to(pubs, carol) == []
    mesh.deliver(pubs)
    assert not carol.is_member(cid)
    after = [bob.seal(cid, text("after")), alice.seal(cid, text("after, from alice"))]
    assert [readable(alice, cid, after[0]), readable(bob, cid, after[1])] == [
        "after",
        "after, from alice",
    ]
    # Carol keeps what she held: nothing of epoch 1 is in it, whatever she tries.
    assert {chain[0] for chain in carol._convs[cid].recv} <= {0}
    assert [readable(carol, cid, envelope) for envelope in after] == [None, None]
    # Not even with every secret in her store: a delivery for her would have been the
    # only way in, and there is none.
    with pytest.raises(GrantRejected):  # and a delivery meant for Bob is not hers
        carol.handle_grant(deliveries_to(pubs, bob)[0])


def test_recorded_delivery_stays_closed_after_rotation_and_grace():
    """A thief who takes Bob's identity key and current prekeys after a rotation and the
    grace period cannot open a delivery recorded before (forward secrecy, §7)."""
    clock = [1_000_000.0]
    store = MemoryKeyStore()
    bob = Engine.open_store(store, clock=lambda: clock[0])
    alice = Engine(Identity.generate())
    for a, b in ((alice, bob), (bob, alice)):
        a.learn_bundle(b.identity.bundle.to_bytes())
    cid, pubs = alice.create_conversation([bob.pid])
    bob.handle_roster(pubs[0].payload)
    (recorded,) = deliveries_to(pubs, bob)  # what an eavesdropper keeps
    assert bob.handle_grant(recorded).installed
    stolen_then = stolen(store)
    secret_then = open_delivery(stolen_then, Delivery.from_bytes(recorded))

    clock[0] += PREKEY_ROTATE_S
    (bundle,) = bob.maintain_prekeys()
    assert bundle.retain and bundle.topic == TOPICS.bundle(bob.pid)
    # Within the grace period the old prekey still opens what is in flight.
    thief = stolen(store)
    assert open_delivery(thief, Delivery.from_bytes(recorded)) == secret_then
    clock[0] += PREKEY_GRACE_S  # prekey 2 is a week old too: it rotates; 1 is deleted
    (bundle,) = bob.maintain_prekeys()

    thief = stolen(store)
    assert [p.public.id for p in thief.prekeys] == [2, 3]
    delivery = Delivery.from_bytes(recorded)
    with pytest.raises(PrekeyUnknown):
        open_delivery(thief, delivery)
    # Nor with any private key it holds, tried by force as the prekey the delivery names.
    for held in thief.prekeys:
        with pytest.raises(CryptoError):
            open_from_prekey(
                held.public.model_copy(update={"id": delivery.prekey_id}),
                held.x25519_private,
                held.mlkem_seed,
                Sealed(delivery.mode, delivery.ephemeral, delivery.kem_ciphertext, delivery.sealed),
                label=b"fieldchat delivery v2",
                context=lambda mode: (
                    Delivery.context(mode, delivery.cid_bytes, 0, 1) + decode_id(bob.pid)
                ),
            )
    # Bob himself keeps reading and receiving: the next delivery goes to prekey 2.
    alice.learn_bundle(bundle.payload)
    pubs = alice.set_policy(cid, Policy())
    bob.handle_roster(pubs[0].payload)
    (fresh,) = deliveries_to(pubs, bob)
    assert Delivery.from_bytes(fresh).prekey_id == 3
    assert bob.handle_grant(fresh).installed
    assert readable(bob, cid, alice.seal(cid, text("still here"))) == "still here"


def test_prekeys_rotate_by_use_and_keep_a_bounded_number_of_old_ones():
    clock = [5_000.0]
    mesh = Mesh("alice")
    bob = mesh.join("bob", Engine(Identity.generate(), clock=lambda: clock[0]))
    cid = mesh.create("alice", "bob")
    assert bob.maintain_prekeys() == []  # one delivery opened: not due
    for _ in range(PREKEY_MAX_OPENS - 1):
        mesh.deliver(mesh["alice"].set_policy(cid, Policy()))
    assert bob.identity.current.opens == PREKEY_MAX_OPENS
    rotations = 0
    for _ in range(MAX_OLD_PREKEYS + 2):
        published = bob.maintain_prekeys()
        assert len(published) == 1
        mesh.deliver(published)  # Alice learns it: the next delivery goes to it
        rotations += 1
        bob.identity.current.opens = PREKEY_MAX_OPENS  # used up again
    assert bob.identity.current.public.id == 1 + rotations
    assert len(bob.identity.prekeys) == 1 + MAX_OLD_PREKEYS  # the oldest already gone


def test_update_locks_out_a_copied_state():
    """A thief holds a full copy of Bob's state (identity, prekeys, chain keys) and sees
    all traffic, but has no live access. It reads until Bob's update, nothing after."""
    mesh = Mesh("alice", "carol")
    store = MemoryKeyStore()
    bob = mesh.join("bob", Engine.open_store(store))
    cid = mesh.create("alice", "bob", "carol")
    bob.flush()
    copy = MemoryKeyStore()
    copy.save(store.load_prefix(""))  # the snapshot: every record Bob's store holds
    thief = Engine.open_store(copy)
    seen: list[Publication] = []

    def everyone(pubs: list[Publication]) -> None:
        seen.extend(pubs)
        mesh.deliver(pubs)

    before = mesh["carol"].seal(cid, text("before the update"))
    assert readable(thief, cid, before) == "before the update"  # the copy works

    everyone(bob.update())  # new prekey (old ones deleted), UPDATE to the admin
    answered = mesh["alice"].answer_updates()
    assert answered, "Alice issues the new epoch once she holds Bob's new prekey"
    everyone(answered)
    assert bob.roster(cid).epoch == 1 and bob.identity.current.public.id == 2
    after = mesh["carol"].seal(cid, text("after the update"))
    assert readable(bob, cid, after) == "after the update"
    from_bob = bob.seal(cid, text("bob, after"))
    assert readable(mesh["alice"], cid, from_bob) == "bob, after"

    # The thief processes everything that was published, in order, as Bob would.
    for pub in seen:
        topic = TOPICS.parse(pub.topic)
        try:
            if topic.kind is TopicKind.PROPOSE:
                thief.handle_roster(pub.payload)
            elif topic.kind is TopicKind.INBOX and topic.pid == bob.pid:
                thief.handle_inbox(pub.payload)
        except FieldchatError:
            pass
    assert thief.roster(cid).epoch == 1
    assert thief.counters["prekey_unknown"] == 1  # the new epoch went to prekey 2
    assert readable(thief, cid, after) is None
    assert readable(thief, cid, from_bob) is None
    with pytest.raises(EpochKeyPending):
        thief.seal(cid, text("as bob"))


def test_an_update_waits_for_the_new_prekey_before_an_epoch_is_keyed_to_it():
    """The UPDATE names Bob's new prekey: an admin that has not seen that bundle yet
    does not deliver the next secret to the old (perhaps stolen) prekey."""
    mesh = Mesh("alice", "bob")
    alice, bob = mesh["alice"], mesh["bob"]
    cid = mesh.create("alice", "bob")
    bundle, request = bob.update()
    alice.open(cid, request.payload)
    assert alice.answer_updates() == []  # Bob's new bundle not here yet
    alice.learn_bundle(bundle.payload)
    pubs = alice.answer_updates()
    (delivery,) = deliveries_to(pubs, bob)
    assert Delivery.from_bytes(delivery).prekey_id == 2
    assert alice.answer_updates() == []  # answered once


def test_an_admin_answers_epoch_requests_at_most_once_a_minute_and_none_is_lost():
    """Any member can send UPDATE or REKEY, and each answer costs a roster and n-1
    deliveries: a member sending them in a loop must not make the admin spend everyone's
    airtime. The first request is answered at once; those within UPDATE_EPOCH_EVERY_S
    wait and are answered together when their turn comes."""
    clock = [1_000.0]
    mesh = Mesh("bob", "carol")
    alice = mesh.join("alice", Engine(Identity.generate(), clock=lambda: clock[0]))
    cid = mesh.create("alice", "bob", "carol")
    alice.open(cid, mesh["bob"].request_epoch(cid))
    first = alice.answer_updates()
    assert deliveries_to(first, mesh["bob"]), "the first request is answered at once"
    mesh.deliver(first)
    assert alice.roster(cid).epoch == 1

    for _ in range(20):  # a loop of requests from bob and one from carol
        alice.open(cid, mesh["bob"].request_epoch(cid))
    alice.open(cid, mesh["carol"].request_epoch(cid))
    assert alice.counters["epoch_request_deferred"] == 21
    assert not alice.epoch_requests_due()
    assert alice.answer_updates() == []
    clock[0] += UPDATE_EPOCH_EVERY_S - 1
    assert not alice.epoch_requests_due() and alice.answer_updates() == []
    clock[0] += 1
    assert alice.epoch_requests_due()
    second = alice.answer_updates()
    mesh.deliver(second)
    assert alice.roster(cid).epoch == 2, "one epoch for all 21 waiting requests"
    assert deliveries_to(second, mesh["carol"]) and deliveries_to(second, mesh["bob"])
    assert not alice.epoch_requests_due() and alice.answer_updates() == []


def test_a_member_two_epochs_behind_catches_up_and_reads_both():
    mesh = Mesh("alice", "bob", "carol", "dave")
    alice, bob, carol = mesh["alice"], mesh["bob"], mesh["carol"]
    cid = mesh.create("alice", "bob", "carol")
    offline: list[Publication] = []  # Carol's queue while she is away
    names = ("alice", "bob", "dave")
    for pubs in (
        alice.add_members(cid, [mesh["dave"].pid]),
        alice.set_policy(cid, Policy(pad=True)),
    ):
        for pub in pubs:
            topic = TOPICS.parse(pub.topic)
            if topic.kind is TopicKind.PROPOSE or topic.pid == carol.pid:
                offline.append(pub)
        sent = [p for p in pubs if TOPICS.parse(p.topic).pid != carol.pid]
        Mesh.deliver(_only(mesh, names), sent)
    epoch1 = bob.seal(cid, text("in epoch 2"))
    assert bob.roster(cid).epoch == 2
    # Carol comes back: both rosters first (a persistent session's queue), then her inbox.
    offline.sort(key=lambda p: TOPICS.parse(p.topic).kind is TopicKind.INBOX)
    for pub in offline:
        if TOPICS.parse(pub.topic).kind is TopicKind.PROPOSE:
            carol.handle_roster(pub.payload)
        else:
            carol.handle_inbox(pub.payload)
    assert carol.roster(cid).epoch == 2
    assert readable(carol, cid, epoch1) == "in epoch 2"
    assert readable(mesh["dave"], cid, carol.seal(cid, text("back"))) == "back"
    # An envelope Bob sealed in epoch 1, read late: the epoch-1 delivery keyed it too.
    assert (2 - 1, 0, 0) in carol._convs[cid].recv


def _only(mesh: Mesh, names: tuple[str, ...]) -> Mesh:
    """A view of ``mesh`` that routes to ``names`` only."""
    view = Mesh()
    view.engines = {n: mesh[n] for n in names}
    return view


def test_a_delivery_of_a_secret_the_roster_does_not_commit_to_is_refused():
    """Bob, a member (no admin), sends Carol a secret of his own for the current epoch:
    had she taken it, she would send under keys Bob chose (§7)."""
    mesh = Mesh("alice", "bob", "carol")
    carol = mesh["carol"]
    cid = mesh.create("alice", "bob", "carol")
    mesh.deliver(mesh["alice"].set_policy(cid, Policy()))  # an epoch Carol has not keyed...
    forged = make_delivery(b"\x0b" * 32, carol.identity.bundle, cid, 1)
    with pytest.raises(GrantRejected):
        carol.handle_grant(forged.to_bytes())
    assert carol.counters["grant"] == 1


def test_a_forged_delivery_costs_one_key_agreement(monkeypatch):
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob")
    forged = make_delivery(b"\x0c" * 32, mesh["bob"].identity.bundle, cid, 0)
    calls: list[str] = []
    real_decapsulate, real_exchange = crypto.mlkem768_decapsulate, crypto.x25519_exchange

    def decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
        calls.append("mlkem")
        return real_decapsulate(seed, ciphertext)

    def exchange(private: bytes, public: bytes) -> bytes:
        calls.append("x25519")
        return real_exchange(private, public)

    # The one hybrid KEM (schemas.crypto.hybrid_open) calls these.
    monkeypatch.setattr(crypto, "mlkem768_decapsulate", decapsulate)
    monkeypatch.setattr(crypto, "x25519_exchange", exchange)
    with pytest.raises(GrantRejected):
        mesh["bob"].handle_grant(forged.to_bytes())
    assert calls == ["x25519", "mlkem"]


def test_sealing_waits_for_the_delivery_and_the_wait_survives_a_restart():
    mesh = Mesh("alice", "carol")
    store = MemoryKeyStore()
    bob = mesh.join("bob", Engine.open_store(store))
    cid = mesh.create("alice", "bob", "carol")
    pubs = mesh["alice"].remove_members(cid, [mesh["carol"].pid])
    bob.handle_roster(pubs[0].payload)
    with pytest.raises(EpochKeyPending):  # not in epoch 0 either: Carol could read it
        bob.seal(cid, text("too early"))
    again = Engine.open_store(store)
    assert again.is_member(cid)
    with pytest.raises(EpochKeyPending):
        again.seal(cid, text("too early"))
    assert again.handle_grant(deliveries_to(pubs, bob)[0]).installed
    assert readable(mesh["alice"], cid, again.seal(cid, text("now"))) == "now"


def test_a_member_rekeys_its_own_chain_without_an_admin():
    mesh = Mesh("alice", "bob", "carol")
    cid = mesh.create("alice", "bob", "carol")
    bob = mesh["bob"]
    grants = bob.rekey_own_chain(cid)
    assert len(grants) == 2 and not any(is_delivery(p.payload) for p in grants)
    mesh.deliver(grants)
    sealed = bob.seal(cid, text("chain 1"))
    assert {readable(mesh[n], cid, sealed) for n in ("alice", "carol")} == {"chain 1"}
    assert (0, 1, 1) in mesh["alice"]._convs[cid].recv
