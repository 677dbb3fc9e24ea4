"""Work before authentication is bounded (issue 13, item 5; PROTOCOL.md §6.4, §8).

A 54-byte unsigned envelope 24,999 steps ahead used to cost a receiver 25,000 chain
steps (28-122 ms of CPU) before AES-GCM refused it. Derivations are counted here (the
real ``chain_step``, wrapped), so the bounds hold on any machine; bench/envelope.py
measures the time (``worst_preauth_envelope_ms``). The attack test imports only what
the code before the fix had.
"""

from __future__ import annotations

import os

import pytest

from fieldchat.device import chains, sealing
from fieldchat.schemas import CryptoError, FieldchatError, MissingKey, TextMessage
from fieldchat.schemas.crypto import chain_step
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes, read_header
from tests.device._mesh import Mesh, text_of


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many chain steps the receiving side derives (``fieldchat.device.chains``)."""
    count = [0]
    real = chain_step

    def counted(key: bytes) -> bytes:
        count[0] += 1
        return real(key)

    monkeypatch.setattr(chains, "chain_step", counted)
    return count


def junk(cid_mesh: tuple[Mesh, str], step: int, *, signed: bool = False) -> bytes:
    """A well-formed envelope of Alice's chain at ``step`` that nobody sealed."""
    mesh, cid = cid_mesh
    index = mesh["bob"].roster(cid).index_of(mesh["alice"].pid)
    header = header_bytes(EnvelopeKind.TEXT, 0, index, 0, step, signed=signed)
    return header + os.urandom(40) + (os.urandom(64) if signed else b"")


@pytest.fixture
def conversation() -> tuple[Mesh, str]:
    mesh = Mesh("alice", "bob")
    return mesh, mesh.create("alice", "bob", sign_every=0)


def refused(mesh: Mesh, cid: str, envelope: bytes) -> str:
    with pytest.raises(FieldchatError) as info:
        mesh["bob"].open(cid, envelope)
    return info.value.reason


def test_an_unsigned_step_far_ahead_costs_a_bounded_derivation(conversation, steps):
    mesh, cid = conversation
    assert refused(mesh, cid, junk(conversation, 24_999)) == "unsigned_jump"
    assert steps[0] <= 513  # MAX_UNSIGNED_JUMP + 1, not 25,000
    most = 0
    for _ in range(60):  # the same junk again: each extends the cache, up to 25,000 ahead
        steps[0] = 0
        assert refused(mesh, cid, junk(conversation, 24_999)) in ("unsigned_jump", "auth")
        most = max(most, steps[0])
    assert most <= 513
    steps[0] = 0
    assert refused(mesh, cid, junk(conversation, 24_999)) == "auth"
    assert refused(mesh, cid, junk(conversation, 12_345)) == "auth"
    assert steps[0] <= 2 * 65  # the cache covers it all now: at most 64 steps each


def test_one_far_forgery_does_not_keep_an_honest_sender_out_of_reach(conversation):
    """A forged envelope far ahead must not make the receiver stop extending its reach
    for the sender's genuine envelopes that come later (they are nearer)."""
    mesh, cid = conversation
    alice, bob = mesh["alice"], mesh["bob"]
    with pytest.raises(FieldchatError):
        bob.open(cid, junk(conversation, 24_999))
    for i in range(1_200):  # lost
        alice.seal(cid, TextMessage(sent_at=1, text=f"lost {i}"))
    later = [alice.seal(cid, TextMessage(sent_at=1, text=f"later {i}")) for i in range(4)]
    opened = []
    for envelope in later:
        try:
            opened.append(bob.open(cid, envelope).message.text)
        except MissingKey:
            pass
    assert opened  # reached within a few envelopes


def test_a_far_signed_step_with_a_bad_signature_derives_nothing(steps):
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob")
    steps[0] = 0  # what creating derived (Bob's JOINED sealed and opened) aside
    with pytest.raises(CryptoError):
        mesh["bob"].open(cid, junk((mesh, cid), 24_999, signed=True))
    assert steps[0] == 0


def test_an_honest_unsigned_sender_far_ahead_is_reached_as_it_keeps_sending(conversation):
    """A lost stretch of 2,000 unsigned steps: each later envelope lets the receiver
    derive 512 steps further, and what it held opens once within reach."""
    mesh, cid = conversation
    alice, bob = mesh["alice"], mesh["bob"]
    for i in range(2_000):
        alice.seal(cid, TextMessage(sent_at=1, text=f"lost {i}"))
    after = [alice.seal(cid, TextMessage(sent_at=1, text=f"after {i}")) for i in range(6)]
    index = bob.roster(cid).index_of(alice.pid)
    held: dict[int, bytes] = {}
    shown = []
    for envelope in after:
        try:
            shown.append(bob.open(cid, envelope).message.text)
        except MissingKey:  # UnsignedJumpTooFar: held, retried once in reach
            held[read_header(envelope)[5]] = envelope
        reach = bob.reach(cid, 0, index, 0)
        for step in [s for s in sorted(held) if s <= reach]:
            shown.append(bob.open(cid, held.pop(step)).message.text)
    assert sorted(shown) == [f"after {i}" for i in range(6)]
    assert bob.counters["unsigned_jump"] == 3  # 2,000 steps: three envelopes to reach


def test_a_grant_with_a_bad_signature_is_refused_before_any_key_agreement(monkeypatch):
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob")
    pubs = mesh["alice"].rekey_own_chain(cid)  # a grant: a member's own chain (§5.4)
    grant = bytearray(next(p.payload for p in pubs if p.topic.endswith("/inbox")))
    grant[-1] ^= 1
    agreed = []
    monkeypatch.setattr(sealing, "hybrid_open", lambda **k: agreed.append(k))
    with pytest.raises(CryptoError):
        mesh["bob"].handle_grant(bytes(grant))
    assert agreed == []


def test_a_held_far_unsigned_step_opens_once_a_signed_one_moves_the_chain():
    """With ``sign_every`` = 1,024, a signed step verifies and jumps; what was held
    further than 512 unsigned steps ahead is then within the window and opens."""
    mesh = Mesh("alice", "bob")
    cid = mesh.create("alice", "bob", sign_every=1024)
    alice, bob = mesh["alice"], mesh["bob"]
    sealed = [alice.seal(cid, TextMessage(sent_at=1, text=str(i))) for i in range(2_050)]
    with pytest.raises(MissingKey):  # UnsignedJumpTooFar: held
        bob.open(cid, sealed[1_500])
    opened = bob.open(cid, sealed[2_048])
    assert opened is not None
    assert opened.signed  # verified first, then the jump of 2,048
    index = bob.roster(cid).index_of(alice.pid)
    reach = bob.reach(cid, 0, index, 0)
    assert reach is not None
    assert reach >= 1_500
    assert text_of(bob.open(cid, sealed[1_500])) == "1500"
