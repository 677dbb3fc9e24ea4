"""The E2E engine: a conversation of three, removal, and each attack of issue 2."""

from __future__ import annotations

import pytest

from fieldchat.device.chains import MAX_FORWARD_JUMP, MAX_SKIPPED_KEYS
from fieldchat.device.engine import BundleStatus, Engine
from fieldchat.device.epochs import epoch_commit, make_delivery
from fieldchat.device.grants import make_grant
from fieldchat.device.identity import PREKEY_ROTATE_S, Identity
from fieldchat.schemas import (
    Bundle,
    ChainGrant,
    CryptoError,
    FieldchatError,
    ForwardJumpTooLarge,
    Grant,
    GrantRejected,
    Member,
    MissingKey,
    NotAMember,
    Policy,
    Receipt,
    ReceiptRange,
    ReceiptType,
    Roster,
    RosterRejected,
    SignatureRequired,
    SkippedKeyMissing,
    StaleEpoch,
    TextMessage,
    UnknownConversation,
    WeakKey,
)
from fieldchat.schemas.envelope import FLAG_SIGNED, read_header
from fieldchat.schemas.ids import decode_id
from tests.device._mesh import Mesh, text_of


def text(s: str, t: int = 1) -> TextMessage:
    return TextMessage(sent_at=t, text=s)


@pytest.fixture
def mesh() -> Mesh:
    return Mesh("alice", "bob", "carol", "mallory")


def test_three_members_exchange_messages(mesh):
    cid = mesh.create("alice", "bob", "carol")
    for sender in ("alice", "bob", "carol"):
        envelope = mesh[sender].seal(cid, text(f"hi from {sender}"))
        for reader in ("alice", "bob", "carol"):
            opened = mesh[reader].open(cid, envelope)
            if reader == sender:
                assert opened is None  # own echo from the broker
            else:
                assert opened is not None
                assert opened.message.text == f"hi from {sender}"
                assert opened.sender == mesh[sender].pid
                assert opened.signed
    assert not mesh.errors or all(isinstance(e, NotAMember) for _, e in mesh.errors)


def test_outsider_cannot_open(mesh):
    cid = mesh.create("alice", "bob")
    envelope = mesh["alice"].seal(cid, text("members only"))
    with pytest.raises(UnknownConversation):
        mesh["mallory"].open(cid, envelope)


def test_removed_member_cannot_read_what_follows_and_others_continue(mesh):
    cid = mesh.create("alice", "bob", "carol")
    before = mesh["bob"].seal(cid, text("before"))
    assert mesh["carol"].open(cid, before).message.text == "before"

    mesh.deliver(mesh["alice"].remove_members(cid, [mesh["carol"].pid]))
    assert not mesh["carol"].is_member(cid)
    roster = mesh["alice"].roster(cid)
    assert roster.epoch == 1 and mesh["carol"].pid not in roster.pids

    for sender, reader in (("alice", "bob"), ("bob", "alice")):
        after = mesh[sender].seal(cid, text(f"after from {sender}"))
        assert mesh[reader].open(cid, after).message.text == f"after from {sender}"
        with pytest.raises((NotAMember, MissingKey)):
            mesh["carol"].open(cid, after)
    # Even with every chain key carol ever held, the new epoch's keys are not among them.
    carol_keys = {c.key for c in mesh["carol"]._convs[cid].recv.values()}
    assert all(c.epoch == 0 for c in mesh["carol"]._convs[cid].recv.values())
    assert mesh["bob"]._convs[cid].send.key not in carol_keys


def test_envelope_from_removed_member_after_rotation_is_rejected(mesh):
    cid = mesh.create("alice", "bob", "carol")
    mesh.deliver(mesh["alice"].remove_members(cid, [mesh["carol"].pid]))
    # Carol still holds her epoch-0 chain; she keeps sending on it.
    conv = mesh["carol"]._convs[cid]
    conv.removed = False
    from fieldchat.device.chains import SendChain

    conv.send = SendChain(0, 0, 50, b"\x01" * 32, 50)
    stale = mesh["bob"]._convs[cid]
    assert stale.epoch == 1
    forged = _seal_with_old_chain(mesh, cid)
    with pytest.raises(StaleEpoch):
        mesh["bob"].open(cid, forged)
    assert mesh["bob"].counters["stale_epoch"] == 1


def _seal_with_old_chain(mesh: Mesh, cid: str) -> bytes:
    """An epoch-0 envelope carol could still produce after her removal."""
    from fieldchat.schemas.crypto import aead_seal
    from fieldchat.schemas.envelope import EnvelopeKind, header_bytes
    from fieldchat.schemas.ids import decode_id
    from fieldchat.schemas.messages import encode_plaintext

    carol = mesh["carol"]
    roster0 = mesh["bob"]._convs[cid].rosters[0]
    index = roster0.index_of(carol.pid)
    chain = mesh["bob"]._convs[cid]  # bob no longer keeps carol's chain: key is irrelevant
    assert (0, index, 0) not in chain.recv
    header = header_bytes(EnvelopeKind.TEXT, 0, index, 0, 7, signed=True)
    pt, _, _ = encode_plaintext(text("still here"))
    body = header + aead_seal(b"\x02" * 32, bytes(12), pt, header + decode_id(cid))
    return body + carol.identity.sign(body + decode_id(cid))


def test_tampered_header_and_ciphertext_are_rejected(mesh):
    cid = mesh.create("alice", "bob")
    envelope = bytearray(mesh["alice"].seal(cid, text("integrity")))
    # kind byte, step, ciphertext, signature: each flip is refused with a typed error.
    for index in (1, 5, 10, len(envelope) - 70, len(envelope) - 1):
        tampered = bytearray(envelope)
        tampered[index] ^= 0x01
        with pytest.raises(FieldchatError):
            mesh["bob"].open(cid, bytes(tampered))
    assert mesh["bob"].counters["auth"] >= 3
    assert mesh["bob"].open(cid, bytes(envelope)).message.text == "integrity"


def test_unsigned_tampering_is_caught_by_aes_gcm():
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob", sign_every=0)
    envelope = mesh["alice"].seal(cid, text("no signature"))
    assert not read_header(envelope)[1] & FLAG_SIGNED
    tampered = envelope[:-1] + bytes([envelope[-1] ^ 1])
    with pytest.raises(CryptoError):
        mesh["bob"].open(cid, tampered)
    assert mesh["bob"].counters["auth"] == 1
    assert text_of(mesh["bob"].open(cid, envelope)) == "no signature"


def test_swapped_sender_is_rejected(mesh):
    cid = mesh.create("alice", "bob", "carol")
    envelope = mesh["alice"].seal(cid, text("from alice"))
    kind, flags, epoch, sender, chain, step, hlen = read_header(envelope)
    carol_index = mesh["bob"].roster(cid).index_of(mesh["carol"].pid)
    swapped = envelope[:3] + bytes([carol_index]) + envelope[4:]
    with pytest.raises(CryptoError):
        mesh["bob"].open(cid, swapped)


def test_replay_is_dropped_quietly_and_counted(mesh):
    cid = mesh.create("alice", "bob")
    envelope = mesh["alice"].seal(cid, text("once"))
    assert mesh["bob"].open(cid, envelope) is not None
    assert mesh["bob"].open(cid, envelope) is None
    assert mesh["bob"].counters["duplicate"] >= 1


def test_out_of_order_within_the_window_and_evicted_beyond_it():
    mesh = Mesh("alice", "bob")
    # Signed: a jump of 2,000 is derived only after a signature (an unsigned one is
    # held past MAX_UNSIGNED_JUMP, see test_far_unsigned_steps_...).
    cid = mesh.create("alice", "bob")
    envelopes = [mesh["alice"].seal(cid, text(str(i))) for i in range(MAX_SKIPPED_KEYS + 5)]
    assert text_of(mesh["bob"].open(cid, envelopes[3])) == "3"
    assert text_of(mesh["bob"].open(cid, envelopes[1])) == "1"
    assert text_of(mesh["bob"].open(cid, envelopes[-1])) == str(MAX_SKIPPED_KEYS + 4)
    with pytest.raises(SkippedKeyMissing):
        mesh["bob"].open(cid, envelopes[0])
    assert text_of(mesh["bob"].open(cid, envelopes[-2])) == str(MAX_SKIPPED_KEYS + 3)


def test_jump_past_the_forward_limit_is_rejected():
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob", sign_every=0)
    conv = mesh["alice"]._convs[cid]
    chain = conv.send
    assert chain is not None
    # Advance alice's chain past the limit without publishing anything.
    from fieldchat.device.chains import advance

    chain.key = advance(chain.key, MAX_FORWARD_JUMP + 2)
    chain.step = chain.reserved = MAX_FORWARD_JUMP + 2
    chain.ahead.clear()
    far = mesh["alice"].seal(cid, text("far ahead"))
    with pytest.raises(ForwardJumpTooLarge):
        mesh["bob"].open(cid, far)
    assert mesh["bob"].counters["forward_jump"] == 1


def test_forged_roster_is_rejected(mesh):
    cid = mesh.create("alice", "bob", "mallory")
    current = mesh["bob"].roster(cid)
    mallory = mesh["mallory"]
    forged = Roster.create(
        cid=cid,
        epoch=current.epoch + 1,
        nonce=b"",
        prev=current.digest(),
        members=(
            Member(key=mallory.identity.public, admin=True),
            Member(key=mesh["bob"].identity.public),
        ),
        policy=Policy(),
        issued_at=2,
        signer_key=mallory.identity.public,
        commit=bytes(32),
        sign=mallory.identity.sign,
    )
    with pytest.raises(RosterRejected):
        mesh["bob"].handle_roster(forged.to_bytes())
    assert mesh["bob"].roster(cid).epoch == current.epoch
    # A roster whose signature does not match its signer key.
    tampered = bytearray(forged.to_bytes())
    tampered[-1] ^= 1
    with pytest.raises(CryptoError):
        mesh["bob"].handle_roster(bytes(tampered))
    assert mesh["bob"].counters["roster"] == 1 and mesh["bob"].counters["auth"] == 1


def test_grant_signed_by_a_non_member_is_rejected(mesh):
    cid = mesh.create("alice", "bob")
    roster = mesh["bob"].roster(cid)
    payload = ChainGrant(
        epoch=roster.epoch,
        roster=roster.digest(),
        sender=roster.index_of(mesh["alice"].pid),
        chain=1,
        step=0,
        key=b"\x05" * 32,
    )
    forged = make_grant(mesh["mallory"].identity, mesh["bob"].identity.bundle, cid, payload)
    with pytest.raises(GrantRejected):
        mesh["bob"].handle_grant(forged.to_bytes())
    assert mesh["bob"].counters["grant"] == 1


def test_downgraded_grant_to_a_post_quantum_member_is_rejected(mesh):
    cid = mesh.create("alice", "bob")
    roster = mesh["bob"].roster(cid)
    payload = ChainGrant(
        epoch=roster.epoch,
        roster=roster.digest(),
        sender=roster.index_of(mesh["alice"].pid),
        chain=3,
        step=0,
        key=b"\x06" * 32,
    )
    downgraded = make_grant(mesh["alice"].identity, x25519_only(mesh["bob"]), cid, payload)
    with pytest.raises(GrantRejected):
        mesh["bob"].handle_grant(downgraded.to_bytes())


def x25519_only(engine: Engine) -> Bundle:
    """``engine``'s bundle with its prekey's ML-KEM key stripped (what a downgrading
    sender would seal to)."""
    bundle = engine.identity.bundle
    return bundle.model_copy(update={"prekey": bundle.prekey.model_copy(update={"mlkem768": None})})


def test_downgraded_delivery_to_a_post_quantum_prekey_is_rejected(mesh):
    cid = mesh.create("alice", "bob")
    downgraded = make_delivery(b"\x05" * 32, x25519_only(mesh["bob"]), cid, 0)
    with pytest.raises(GrantRejected):
        mesh["bob"].handle_grant(downgraded.to_bytes())


def test_all_zero_x25519_shared_secret_is_rejected():
    """A grant whose ephemeral key is a low-order point gives the all-zero secret."""
    mesh = Mesh("alice", "bob", post_quantum=["alice"])
    alice, bob = mesh["alice"].identity, mesh["bob"]
    cid = mesh.create("alice", "bob", require_pq=False)
    roster = bob.roster(cid)
    payload = ChainGrant(epoch=0, roster=roster.digest(), sender=0, chain=1, step=0, key=bytes(32))
    grant = make_grant(alice, bob.identity.bundle, cid, payload)
    low_order = bytes(32)  # the identity point
    forged = Grant.create(
        mode=grant.mode,
        cid=grant.cid,
        granter_key=alice.public,
        recipient=grant.recipient,
        prekey_id=grant.prekey_id,
        ephemeral=low_order,
        kem_ciphertext=None,
        sealed=grant.sealed,
        sign=alice.sign,
    )
    with pytest.raises(WeakKey):
        bob.handle_grant(forged.to_bytes())
    assert bob.counters["weak_key"] == 1
    weak = bob.identity.bundle.prekey.model_copy(update={"x25519": low_order})
    with pytest.raises(WeakKey):
        make_grant(alice, bob.identity.bundle.model_copy(update={"prekey": weak}), cid, payload)


def test_signature_policy_every_nth():
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob", sign_every=4)
    signed = []
    for i in range(8):
        envelope = mesh["alice"].seal(cid, text(str(i)))
        signed.append(bool(read_header(envelope)[1] & FLAG_SIGNED))
        opened = mesh["bob"].open(cid, envelope)
        assert opened is not None
        assert opened.signed == signed[-1]
    assert signed == [True, False, False, False, True, False, False, False]


def test_stripping_a_required_signature_is_rejected(mesh):
    cid = mesh.create("alice", "bob")
    envelope = mesh["alice"].seal(cid, text("signed"))
    stripped = envelope[:1] + bytes([envelope[1] & ~FLAG_SIGNED]) + envelope[2:-64]
    with pytest.raises(SignatureRequired):
        mesh["bob"].open(cid, stripped)


def test_compression_and_padding_round_trip_and_hide_length():
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob", compress=True, pad=True, sign_every=0)
    sizes = set()
    for n in (33, 40, 50, 60):
        envelope = mesh["alice"].seal(cid, text("ab" * n))
        sizes.add(len(envelope))
        assert text_of(mesh["bob"].open(cid, envelope)) == "ab" * n
    assert len(sizes) < 4


def test_receipts_and_control_messages_round_trip(mesh):
    cid = mesh.create("alice", "bob")
    receipt = Receipt(
        type=ReceiptType.READ, ranges=(ReceiptRange(epoch=0, sender=0, chain=0, first=0, last=9),)
    )
    assert mesh["alice"].open(cid, mesh["bob"].seal(cid, receipt)).message == receipt
    opened = mesh["alice"].open(cid, mesh["bob"].leave(cid))
    assert opened.message.op.name == "LEAVE"


def test_grants_arriving_before_the_roster_are_held():
    mesh = Mesh("alice", "bob")
    cid, pubs = mesh["alice"].create_conversation([mesh["bob"].pid])
    roster = next(p for p in pubs if p.topic.endswith("/propose"))
    grant = next(p for p in pubs if p.topic.endswith("/inbox"))
    result = mesh["bob"].handle_grant(grant.payload)
    assert result.needs_roster and not result.installed
    replies = mesh["bob"].handle_roster(roster.payload)
    mesh.deliver(replies)
    assert text_of(mesh["bob"].open(cid, mesh["alice"].seal(cid, text("in order")))) == "in order"


def test_a_rotated_prekey_is_the_same_identity_and_an_older_one_is_ignored():
    """Prekeys rotate (PROTOCOL.md §2.5): a newer bundle of a pid is an update, never a
    key change (the pid is the hash of the identity key), and a bundle with an older
    prekey is ignored, so nobody can roll a member back to a prekey it deleted."""
    clock = [1_000.0]
    alice = Engine(Identity.generate())
    bob = Engine(Identity.from_seed(b"\x09" * 32, created_at=10), clock=lambda: clock[0])
    first = bob.identity.bundle.to_bytes()
    assert alice.learn_bundle(first).status is BundleStatus.NEW
    assert alice.learn_bundle(first).status is BundleStatus.SAME
    alice.mark_verified(bob.pid)
    clock[0] += PREKEY_ROTATE_S
    (published,) = bob.maintain_prekeys()
    update = alice.learn_bundle(published.payload)
    assert update.status is BundleStatus.UPDATED
    assert update.previous_fingerprint == update.fingerprint == bob.identity.fingerprint()
    assert alice.is_verified(bob.pid)

    def prekey_id() -> int:
        bundle = alice.bundle_of(bob.pid)
        assert bundle is not None
        return bundle.prekey.id

    assert prekey_id() == 2
    assert alice.learn_bundle(first).status is BundleStatus.OLDER
    assert prekey_id() == 2


def test_browser_participant_without_mlkem_gets_x25519_grants_and_roster_says_so():
    mesh = Mesh("alice", "web", post_quantum=["alice"])
    with pytest.raises(NotAMember):  # the default policy requires post-quantum members
        mesh["alice"].create_conversation([mesh["web"].pid])
    cid = mesh.create("alice", "web", require_pq=False)
    roster = mesh["web"].roster(cid)
    flags = {m.pid: m.pq for m in roster.members}
    assert flags == {mesh["alice"].pid: True, mesh["web"].pid: False}
    assert text_of(mesh["web"].open(cid, mesh["alice"].seal(cid, text("hi web")))) == "hi web"
    assert not mesh["web"].roster(cid).policy.require_pq


def test_add_member_later_reads_from_then_on_not_before(mesh):
    cid = mesh.create("alice", "bob")
    early = mesh["alice"].seal(cid, text("before carol"))
    mesh.deliver(mesh["alice"].add_members(cid, [mesh["carol"].pid]))
    late = mesh["alice"].seal(cid, text("with carol"))
    assert mesh["carol"].open(cid, late).message.text == "with carol"
    with pytest.raises(StaleEpoch):
        mesh["carol"].open(cid, early)


def test_non_admin_cannot_change_the_roster(mesh):
    cid = mesh.create("alice", "bob")
    with pytest.raises(NotAMember):
        mesh["bob"].remove_members(cid, [mesh["alice"].pid])


def test_browser_member_grants_x25519_to_post_quantum_members():
    """A member without ML-KEM can only make X25519 grants; they are accepted from it."""
    mesh = Mesh("alice", "bob", "web", post_quantum=["alice", "bob"])
    cid = mesh.create("alice", "bob", "web", require_pq=False)
    assert not [e for _, e in mesh.errors if e.reason == "grant"]
    envelope = mesh["web"].seal(cid, text("from the browser"))
    for reader in ("alice", "bob"):
        assert text_of(mesh[reader].open(cid, envelope)) == "from the browser"


def test_post_quantum_member_joins_a_conversation_a_browser_founded():
    """The browser's X25519 grant may arrive before the roster; it is held, then checked."""
    mesh = Mesh("web", "alice", post_quantum=["alice"])
    cid, pubs = mesh["web"].create_conversation(
        [mesh["alice"].pid], policy=Policy(require_pq=False)
    )
    grant = next(p for p in pubs if p.topic.endswith("/inbox"))
    roster = next(p for p in pubs if p.topic.endswith("/propose"))
    assert mesh["alice"].handle_grant(grant.payload).needs_roster
    mesh.deliver(mesh["alice"].handle_roster(roster.payload))
    envelope = mesh["web"].seal(cid, text("hello from the browser"))
    assert text_of(mesh["alice"].open(cid, envelope)) == "hello from the browser"


def test_a_grant_sealed_without_the_recipients_mlkem_key_does_not_open():
    """An X25519-only seal to a prekey that has ML-KEM is a downgrade: refused before
    anything is decrypted (and its transcript would not match either)."""
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob")
    roster = mesh["bob"].roster(cid)
    payload = ChainGrant(
        epoch=0, roster=roster.digest(), sender=0, chain=4, step=0, key=b"\x07" * 32
    )
    downgraded = make_grant(mesh["alice"].identity, x25519_only(mesh["bob"]), cid, payload)
    with pytest.raises(GrantRejected):
        mesh["bob"].handle_grant(downgraded.to_bytes())


def test_next_step_tells_where_a_granted_chain_starts(mesh):
    cid = mesh.create("alice", "bob")
    index = mesh["bob"].roster(cid).index_of(mesh["alice"].pid)
    assert mesh["bob"].next_step(cid, 0, index, 0) == 0  # granted, nothing opened yet
    envelopes = [mesh["alice"].seal(cid, text(str(i))) for i in range(3)]
    mesh["bob"].open(cid, envelopes[2])  # overtook steps 0 and 1
    assert mesh["bob"].next_step(cid, 0, index, 0) == 3
    assert mesh["bob"].next_step(cid, 0, index, 9) is None  # no such chain granted
    assert mesh["mallory"].next_step(cid, 0, index, 0) is None


def test_preverified_batch_opens_in_order_and_a_forgery_still_fails_in_its_place(mesh):
    from concurrent.futures import ThreadPoolExecutor

    cid = mesh.create("alice", "bob", "carol")
    envelopes = [mesh["alice"].seal(cid, text(f"m{i}")) for i in range(6)]
    forged = bytearray(envelopes[3])
    forged[-1] ^= 0x01  # the signature
    envelopes[3] = bytes(forged)
    carols = mesh["carol"].seal(cid, text("from carol"))
    batch = [(cid, e) for e in [*envelopes, carols]]
    with ThreadPoolExecutor(1) as pool:
        assert mesh["bob"].preverify(batch, pool) == 6  # all but the forgery
    opened = []
    for _, envelope in batch:
        try:
            opened.append(mesh["bob"].open(cid, envelope).message.text)
        except CryptoError:
            opened.append("rejected")
    assert opened == ["m0", "m1", "m2", "rejected", "m4", "m5", "from carol"]
    # A verified envelope is not trusted again under another signer: Mallory's key in
    # place of Alice's (a re-keyed chain) means checking again, and failing.
    again = mesh["alice"].seal(cid, text("again"))
    with ThreadPoolExecutor(1) as pool:
        mesh["bob"].preverify([(cid, again), (cid, again)], pool)
    _, _, epoch, sender, chain_no, _, _ = read_header(again)
    chain = mesh["bob"]._convs[cid].recv[(epoch, sender, chain_no)]
    chain.signer_key = mesh["mallory"].identity.bundle.ed25519
    with pytest.raises(CryptoError):
        mesh["bob"].open(cid, again)


def test_every_member_keeps_an_epoch_that_requires_post_quantum_hybrid():
    """An admin's roster requires post-quantum members yet lists one without ML-KEM (a
    faulty or hostile admin: the engine itself never issues it). The members enforce the
    policy too: a member's own re-key grants nothing to that member (counted), and an
    X25519-only grant from it is refused though the roster marks it as not post-quantum:
    no key of the epoch travels without ML-KEM."""
    mesh = Mesh("alice", "bob", "web", post_quantum=["alice", "bob"])
    cid = mesh.create("alice", "bob")
    alice, bob, web = mesh["alice"], mesh["bob"], mesh["web"]
    roster0 = alice.roster(cid)
    secret = b"\x0a" * 32
    roster1 = Roster.create(
        cid=cid,
        epoch=1,
        nonce=b"",
        prev=roster0.digest(),
        members=(*roster0.members, Member(key=web.identity.public, admin=False, pq=False)),
        policy=roster0.policy,
        issued_at=roster0.issued_at,
        signer_key=alice.identity.public,
        commit=epoch_commit(secret, decode_id(cid), 1),
        sign=alice.identity.sign,
    )
    assert roster1.policy.require_pq
    bob.handle_roster(roster1.to_bytes())
    assert bob.handle_grant(make_delivery(secret, bob.identity.bundle, cid, 1).to_bytes()).installed
    grants = bob.rekey_own_chain(cid)
    assert [p.topic for p in grants] == [mesh.topics.inbox(alice.pid)]  # none to web
    assert bob.counters["not_post_quantum"] == 1
    # Web's own grant to bob by X25519 only (as a browser without ML-KEM makes them; the
    # roster marks web as not post-quantum, so only the policy refuses it).
    payload = ChainGrant(
        epoch=1, roster=roster1.digest(), sender=2, chain=1, step=0, key=b"\x05" * 32
    )
    grant = make_grant(web.identity, x25519_only(bob), cid, payload)
    with pytest.raises(GrantRejected):
        bob.handle_grant(grant.to_bytes())
