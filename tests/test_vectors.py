"""The protocol vectors in tests/vectors/protocol.json: regenerated and re-opened."""

from __future__ import annotations

import json

import pytest

from fieldchat.device.chains import nonce, step_keys
from fieldchat.device.engine import Engine
from fieldchat.device.epochs import chain_key, epoch_commit, open_delivery
from fieldchat.device.grants import accept_grant
from fieldchat.schemas import Bundle, ChainGrant, Grant, Roster, TextMessage
from fieldchat.schemas.crypto import (
    HybridSealed,
    aead_open,
    chain_step,
    hybrid_open,
    x25519_public_from_private,
)
from fieldchat.schemas.delivery import Delivery
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.errors import CryptoError
from fieldchat.schemas.frame import pack_frame, split
from fieldchat.schemas.ids import decode_id
from tests.vectors.generate import PATH, build, identity, recorded_of

VECTORS = json.loads(PATH.read_text())
RECIPIENTS = {"bob": 2, "web": 3, "web_pq": 4}


def test_file_matches_a_fresh_generation():
    """Every deterministic byte is reproduced from the seeds; hybrid grants and
    deliveries are recorded."""
    assert build(recorded_of(VECTORS)) == VECTORS


@pytest.mark.parametrize("vector", VECTORS["identities"], ids=lambda v: v["name"])
def test_identity_vectors(vector):
    bundle = Bundle.from_bytes(bytes.fromhex(vector["bundle"]))
    assert bundle.pid == vector["pid"]
    assert bundle.prekey.id == vector["prekey_id"]
    assert (
        x25519_public_from_private(bytes.fromhex(vector["prekey_x25519_private"])).hex()
        == (vector["prekey_x25519_public"])
    )
    assert bundle.fingerprint() == vector["fingerprint"]
    assert bundle.post_quantum == vector["post_quantum"]


@pytest.mark.parametrize("vector", VECTORS["chain"], ids=lambda v: f"step{v['step']}")
def test_chain_vectors(vector):
    ck = bytes.fromhex(vector["chain_key"])
    assert chain_step(ck).hex() == vector["hmac_sha512"]
    key, nxt = step_keys(ck)
    assert (key.hex(), nxt.hex()) == (vector["message_key"], vector["next_chain_key"])
    assert nonce(vector["step"]).hex() == vector["nonce"]


@pytest.mark.parametrize(
    "vector", VECTORS["envelopes"], ids=lambda v: f"{v['conversation']}-{v['step']}"
)
def test_envelopes_open_with_the_granted_chain_key(vector):
    """Open each envelope from the vector's data alone, as the browser does."""
    conv = next(c for c in VECTORS["conversations"] if c["label"] == vector["conversation"])
    data = bytes.fromhex(vector["envelope"])
    kind, flags, epoch, sender, chain, step, hlen = read_header(data)
    assert (epoch, sender, chain, step) == (
        vector["epoch"],
        vector["sender_index"],
        vector["chain"],
        vector["step"],
    )
    ck = bytes.fromhex(conv["sender_chain_key"])
    for _ in range(step):
        ck = step_keys(ck)[1]
    end = len(data) - (64 if flags & 0x80 else 0)
    from fieldchat.schemas.ids import decode_id
    from fieldchat.schemas.messages import decode_plaintext

    aad = data[:hlen] + decode_id(vector["cid"]) + bytes.fromhex(vector["coverage"])
    assert read_header(data).cover(data) == vector["cover"]
    plaintext = aead_open(step_keys(ck)[0], nonce(step), data[hlen:end], aad)
    message = decode_plaintext(
        kind, plaintext, compressed=bool(flags & 0x40), padded=bool(flags & 0x20)
    )
    assert message == TextMessage(**vector["message"])


@pytest.mark.parametrize("conv", VECTORS["conversations"], ids=lambda c: c["label"])
def test_key_schedule_vectors(conv):
    """The epoch secret gives the roster's commit and every member's chain 0 (§6.1)."""
    secret = bytes.fromhex(conv["epoch_secret"])
    roster = Roster.from_bytes(bytes.fromhex(conv["roster"]))
    assert epoch_commit(secret, decode_id(conv["cid"]), roster.epoch).hex() == conv["commit"]
    assert roster.commit.hex() == conv["commit"]
    keys = [chain_key(secret, roster.digest(), i).hex() for i in range(len(roster.members))]
    assert keys == conv["chain_keys"]


@pytest.mark.parametrize("vector", VECTORS["deliveries"], ids=lambda v: v["name"])
def test_delivery_vectors(vector):
    tag = RECIPIENTS[vector["recipient"]]
    recipient = identity(tag, post_quantum=tag != 3)
    delivery = Delivery.from_bytes(bytes.fromhex(vector["delivery"]))
    assert delivery.mode.name.lower() == vector["mode"]
    assert (delivery.cid, delivery.epoch) == (vector["cid"], vector["epoch"])
    assert open_delivery(recipient, delivery).hex() == vector["epoch_secret"]


def test_envelopes_open_through_the_engine_of_each_recipient():
    """The web participant (X25519 delivery) opens every envelope."""
    for conv in VECTORS["conversations"]:
        web = Engine(identity(3, post_quantum=False))
        web.learn_bundle(bytes.fromhex(VECTORS["identities"][0]["bundle"]))
        web.handle_roster(bytes.fromhex(conv["roster"]))
        assert web.handle_grant(bytes.fromhex(conv["delivery_to_web_x25519"])).installed
        for vector in VECTORS["envelopes"]:
            if vector["conversation"] == conv["label"]:
                opened = web.open(conv["cid"], bytes.fromhex(vector["envelope"]))
                assert opened is not None
                assert opened.message == TextMessage(**vector["message"])
                assert opened.sender == vector["sender_pid"]
        # Delayed authentication (§6.5): what was pending is verified by the signed step.
        settled = [(s.steps, s.verdict.value) for s in web.take_settled()]
        assert settled == ([((1, 2), "verified")] if conv["label"] == "every_third" else [])


@pytest.mark.parametrize("vector", VECTORS["grants"], ids=lambda v: v["name"])
def test_grant_vectors(vector):
    tag = RECIPIENTS[vector["recipient"]]
    recipient = identity(tag, post_quantum=tag != 3)
    grant = Grant.from_bytes(bytes.fromhex(vector["grant"]))
    assert grant.mode.name.lower() == vector["mode"]
    assert accept_grant(recipient, grant) == ChainGrant.from_bytes(bytes.fromhex(vector["payload"]))


@pytest.mark.parametrize("vector", VECTORS["hybrid_kem"], ids=lambda v: v["name"])
def test_hybrid_kem_vectors(vector):
    """The combiner alone (PROTOCOL.md §5.3): the recipient of the seed opens it, and a
    changed context or a transcript of the other mode does not."""
    seed = bytes.fromhex(vector["recipient_seed"])
    recipient = identity(seed[0], post_quantum=vector["mode"] == "hybrid")
    kem_ct = vector["kem_ciphertext"]
    message = HybridSealed(
        bytes.fromhex(vector["ephemeral"]),
        bytes.fromhex(kem_ct) if kem_ct else None,
        bytes.fromhex(vector["sealed"]),
    )

    def open_with(context: bytes) -> bytes:
        held = recipient.current
        return hybrid_open(
            x25519_private=held.x25519_private,
            mlkem768_seed=held.mlkem_seed,
            x25519_public=held.public.x25519,
            mlkem768_public=held.public.mlkem768,
            message=message,
            context=context,
        )

    assert open_with(bytes.fromhex(vector["context"])).hex() == vector["plaintext"]
    with pytest.raises(CryptoError):
        open_with(bytes.fromhex(vector["context"]) + b"!")


def test_rosters_decode_and_found_their_cid():
    from fieldchat.schemas import verify_roster_chain

    for conv in VECTORS["conversations"]:
        roster = Roster.from_bytes(bytes.fromhex(conv["roster"]))
        verify_roster_chain(roster, None)
        assert roster.cid == conv["cid"]


@pytest.mark.parametrize("case", VECTORS["roster_chain"], ids=lambda c: c["why"][:30])
def test_roster_chain_vectors(case):
    """Each roster against the one it must follow (PROTOCOL.md §5.2): the chain rule a
    joiner applies from epoch 0 and a member applies from its newest roster."""
    from fieldchat.schemas import RosterRejected, verify_roster_chain

    chain = [Roster.from_bytes(bytes.fromhex(c["roster"])) for c in VECTORS["roster_chain"]]
    roster = Roster.from_bytes(bytes.fromhex(case["roster"]))
    prev = chain[case["follows"]] if case["follows"] >= 0 else None
    if case["chains"]:
        verify_roster_chain(roster, prev)
    else:
        with pytest.raises(RosterRejected):
            verify_roster_chain(roster, prev)


def test_a_joiner_adopts_the_vector_chain_only_from_epoch_0():
    """Bob, listed at every epoch, gets epoch 2 first: held until 0 and 1 arrive."""
    from fieldchat.schemas import FieldchatError

    cases = [c for c in VECTORS["roster_chain"] if c["chains"]]
    bob = Engine(identity(2))
    with pytest.raises(FieldchatError) as info:
        bob.handle_roster(bytes.fromhex(cases[2]["roster"]))
    assert info.value.reason == "roster_pending"
    bob.handle_roster(bytes.fromhex(cases[0]["roster"]))
    bob.handle_roster(bytes.fromhex(cases[1]["roster"]))
    cid = VECTORS["conversations"][0]["cid"]
    assert bob.roster(cid).to_bytes().hex() == cases[2]["roster"]


def test_limits_match_the_code():
    from fieldchat.device import _coverage, chains, engine
    from fieldchat.schemas import envelope, grant

    assert VECTORS["limits"] == {
        "keep_epochs": engine.KEEP_EPOCHS,
        "max_chain_ends": grant.MAX_CHAIN_ENDS,
        "max_forward_jump": chains.MAX_FORWARD_JUMP,
        "max_unsigned_jump": chains.MAX_UNSIGNED_JUMP,
        "mark_every": chains.MARK_EVERY,
        "max_cover": envelope.MAX_COVER,
        "max_cover_tries": _coverage.MAX_COVER_TRIES,
    }


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=lambda v: v["conversation"])
def test_frame_vectors(vector):
    """A frame is its envelopes, length-prefixed behind one marker byte (PROTOCOL.md §3.4)."""
    envelopes = [bytes.fromhex(e) for e in vector["envelopes"]]
    frame = bytes.fromhex(vector["frame"])
    assert split(frame) == envelopes
    assert pack_frame(envelopes) == frame
    assert {e["envelope"] for e in VECTORS["envelopes"]} >= set(vector["envelopes"])
