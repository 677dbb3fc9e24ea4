"""Generate the protocol test vectors from fixed seeds (PROTOCOL.md §9).

    python -m tests.vectors.generate          # rewrites tests/vectors/protocol.json

Everything is deterministic (seeded randomness, fixed clock, deterministic Ed25519
and AES-GCM) except ML-KEM encapsulation, whose randomness ``cryptography`` does not
let us inject: the hybrid grant and the hybrid delivery are recorded once and checked
by opening them (and recorded again when the recorded one no longer opens to the
current payload). Prekeys come from seeded randomness, as an identity's never derive
from its seed (PROTOCOL.md §2.4).
The browser client checks the same file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fieldchat.device.chains import (
    MARK_EVERY,
    MAX_FORWARD_JUMP,
    MAX_UNSIGNED_JUMP,
    nonce,
    step_keys,
)
from fieldchat.device.engine import KEEP_EPOCHS, Engine
from fieldchat.device.epochs import chain_key, epoch_commit, make_delivery, open_delivery
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.schemas import ChainGrant, FieldchatError, Grant, Member, Policy, Roster, TextMessage
from fieldchat.schemas.crypto import chain_step
from fieldchat.schemas.delivery import Delivery
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.frame import pack_frame
from fieldchat.schemas.grant import MAX_CHAIN_ENDS, ChainEnd
from fieldchat.schemas.ids import decode_id

PATH = Path(__file__).with_name("protocol.json")
CLOCK = 1_700_000_000


class SeededRandom:
    """Deterministic stand-in for ``os.urandom``: SHAKE-256 of a seed and a counter."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


def identity(tag: int, *, post_quantum: bool = True) -> Identity:
    return Identity.from_seed(
        bytes([tag]) * 32,
        created_at=CLOCK,
        post_quantum=post_quantum,
        random=SeededRandom(b"prekey" + bytes([tag])),
    )


def _identity_vector(name: str, tag: int, ident: Identity) -> dict[str, Any]:
    b = ident.bundle
    prekey = ident.current
    mlkem = b.prekey.mlkem768
    return {
        "name": name,
        "seed": (bytes([tag]) * 32).hex(),
        "post_quantum": b.post_quantum,
        "pid": ident.pid,
        "ed25519_public": b.ed25519.hex(),
        "prekey_id": b.prekey.id,
        "prekey_x25519_public": b.prekey.x25519.hex(),
        "prekey_x25519_private": prekey.x25519_private.hex(),
        "prekey_mlkem_seed": prekey.mlkem_seed.hex() if prekey.mlkem_seed else None,
        "prekey_mlkem768_public_sha256": hashlib.sha256(mlkem).hexdigest() if mlkem else None,
        "bundle": b.to_bytes().hex(),
        "fingerprint": b.fingerprint(),
    }


def build(hybrid_grant: str | None = None, hybrid_delivery: str | None = None) -> dict[str, Any]:
    """The vectors; ``hybrid_grant`` and ``hybrid_delivery`` reuse recorded ones (hex)."""
    alice, bob, web = identity(1), identity(2), identity(3, post_quantum=False)
    out: dict[str, Any] = {
        "about": "fieldchat protocol vectors v2; see PROTOCOL.md §9. All byte strings are hex.",
        "identities": [
            _identity_vector("alice", 1, alice),
            _identity_vector("bob", 2, bob),
            _identity_vector("web", 3, web),
        ],
    }

    ck = bytes(range(32))
    steps = []
    for step in range(4):
        key, nxt = step_keys(ck)
        steps.append(
            {
                "step": step,
                "chain_key": ck.hex(),
                "hmac_sha512": chain_step(ck).hex(),
                "message_key": key.hex(),
                "nonce": nonce(step).hex(),
                "next_chain_key": nxt.hex(),
            }
        )
        ck = nxt
    out["chain"] = steps

    envelopes: list[dict[str, Any]] = []
    conversations: list[dict[str, Any]] = []
    chain_cases: list[dict[str, Any]] = []
    policies = {
        "signed": Policy(),
        "unsigned_compressed_padded": Policy(sign_every=0, compress=True, pad=True),
    }
    for label, policy in policies.items():
        random = SeededRandom(label.encode())
        engine = Engine(alice, clock=lambda: CLOCK, random=random)
        for other in (bob, web):
            engine.learn_bundle(other.bundle.to_bytes())
        cid, pubs = engine.create_conversation([bob.pid, web.pid], policy=policy)
        draws = SeededRandom(label.encode())  # the same draws: the nonce, then the secret
        draws(16)
        epoch_secret = draws(32)
        roster = engine.roster(cid)
        assert roster.commit == epoch_commit(epoch_secret, decode_id(cid), 0)
        conv = engine._convs[cid]
        assert conv.send is not None
        sender_key = conv.send.key
        web_delivery = next(p for p in pubs if p.topic.endswith(f"{web.pid}/inbox"))
        conversations.append(
            {
                "label": label,
                "cid": cid,
                "roster": roster.to_bytes().hex(),
                "creator": "alice",
                "epoch_secret": epoch_secret.hex(),
                "commit": roster.commit.hex(),
                "chain_keys": [
                    chain_key(epoch_secret, roster.digest(), i).hex()
                    for i in range(len(roster.members))
                ],
                "sender_chain_key": sender_key.hex(),
                "delivery_to_web_x25519": web_delivery.payload.hex(),
            }
        )
        texts = ["hello", "Pump 3 at 4.2 bar; valve B closed. Back on site 14:30 ✓", "x" * 300]
        for i, text in enumerate(texts):
            sealed = engine.seal(cid, TextMessage(sent_at=CLOCK + i, text=text))
            kind, flags, epoch, sender, chain, step, hlen = read_header(sealed)
            envelopes.append(
                {
                    "conversation": label,
                    "cid": cid,
                    "sender_pid": alice.pid,
                    "sender_ed25519": alice.bundle.ed25519.hex(),
                    "epoch": epoch,
                    "sender_index": sender,
                    "chain": chain,
                    "step": step,
                    "kind": int(kind),
                    "flags": flags,
                    "header": sealed[:hlen].hex(),
                    "message": {"sent_at": CLOCK + i, "text": text},
                    "envelope": sealed.hex(),
                }
            )
        if label == "signed":
            chain_cases = _roster_chain(engine, cid, bob)
    out["conversations"] = conversations
    out["roster_chain"] = chain_cases
    out["envelopes"] = envelopes
    # A device's backlog in one PUBLISH (PROTOCOL.md §3.4): each conversation's envelopes.
    out["frames"] = [
        {
            "conversation": conv["label"],
            "envelopes": [e["envelope"] for e in mine],
            "frame": pack_frame([bytes.fromhex(e["envelope"]) for e in mine]).hex(),
        }
        for conv in conversations
        if (mine := [e for e in envelopes if e["conversation"] == conv["label"]])
    ]

    # A grant of epoch 3 stating where the granter's chains of epochs 2 and 1 ended
    # (§5.3, §6.4): the receiver takes unsigned steps of those chains below them.
    ends = (ChainEnd(epoch=2, chain=0, next_step=17), ChainEnd(epoch=1, chain=0, next_step=0))
    payload = ChainGrant(
        epoch=3, roster=bytes(32), sender=0, chain=1, step=5, key=bytes(32), ends=ends
    )
    x_grant = make_grant(alice, web.bundle, "a" * 26, payload, random=SeededRandom(b"grant"))
    if hybrid_grant is None:
        hybrid_grant = make_grant(alice, bob.bundle, "a" * 26, payload).to_bytes().hex()
    out["grants"] = [
        {
            "mode": "x25519",
            "granter": "alice",
            "recipient": "web",
            "cid": "a" * 26,
            "ephemeral_private": SeededRandom(b"grant")(32).hex(),
            "payload": payload.to_bytes().hex(),
            "grant": x_grant.to_bytes().hex(),
            "deterministic": True,
        },
        {
            "mode": "hybrid",
            "granter": "alice",
            "recipient": "bob",
            "cid": "a" * 26,
            "payload": payload.to_bytes().hex(),
            "grant": hybrid_grant,
            "deterministic": False,
        },
    ]
    # Epoch secrets sealed to a prekey (§5.3): X25519 (deterministic) and hybrid.
    secret = bytes(range(100, 132))
    x_delivery = make_delivery(secret, web.bundle, "a" * 26, 3, random=SeededRandom(b"delivery"))
    if hybrid_delivery is None:
        hybrid_delivery = make_delivery(secret, bob.bundle, "a" * 26, 3).to_bytes().hex()
    out["deliveries"] = [
        {
            "mode": "x25519",
            "recipient": "web",
            "cid": "a" * 26,
            "epoch": 3,
            "ephemeral_private": SeededRandom(b"delivery")(32).hex(),
            "epoch_secret": secret.hex(),
            "delivery": x_delivery.to_bytes().hex(),
            "deterministic": True,
        },
        {
            "mode": "hybrid",
            "recipient": "bob",
            "cid": "a" * 26,
            "epoch": 3,
            "epoch_secret": secret.hex(),
            "delivery": hybrid_delivery,
            "deterministic": False,
        },
    ]
    out["limits"] = {
        "keep_epochs": KEEP_EPOCHS,
        "max_chain_ends": MAX_CHAIN_ENDS,
        "max_forward_jump": MAX_FORWARD_JUMP,
        "max_unsigned_jump": MAX_UNSIGNED_JUMP,
        "mark_every": MARK_EVERY,
    }
    return out


def _roster_chain(admin: Engine, cid: str, member: Identity) -> list[dict[str, Any]]:
    """Epochs 1 and 2 after epoch 0 of ``cid`` (a policy change, a removal), and two
    rosters that do not chain: each case names the roster it must follow (§5.2)."""
    admin.set_policy(cid, Policy(pad=True))
    admin.remove_members(
        cid, [p for p in admin.roster(cid).pids if p not in (admin.pid, member.pid)]
    )
    rosters = [admin._convs[cid].rosters[e] for e in range(3)]
    by_member = Roster.create(  # a member who is no admin signs the next epoch
        cid=cid,
        epoch=2,
        nonce=b"",
        prev=rosters[1].digest(),
        members=(Member(key=member.public, admin=True, pq=True),),
        policy=rosters[1].policy,
        issued_at=CLOCK,
        signer_key=member.bundle.ed25519,
        commit=bytes(32),
        sign=member.sign,
    )
    skipping = Roster.create(  # an admin's epoch 2 naming epoch 0 as its predecessor
        cid=cid,
        epoch=2,
        nonce=b"",
        prev=rosters[0].digest(),
        members=rosters[2].members,
        policy=rosters[2].policy,
        issued_at=CLOCK,
        signer_key=admin.identity.public,
        commit=rosters[2].commit,
        sign=admin.identity.sign,
    )
    cases: list[dict[str, Any]] = [
        {"roster": r.to_bytes().hex(), "follows": r.epoch - 1, "chains": True, "why": why}
        for r, why in zip(
            rosters, ("founds the conversation", "policy change", "removal"), strict=True
        )
    ]
    cases += [
        {
            "roster": by_member.to_bytes().hex(),
            "follows": 1,
            "chains": False,
            "why": "signed by a member who is no admin of epoch 1",
        },
        {
            "roster": skipping.to_bytes().hex(),
            "follows": 1,
            "chains": False,
            "why": "its prev is the digest of epoch 0, not of epoch 1",
        },
    ]
    return cases


def _opens(vector: dict[str, Any]) -> bool:
    try:
        granted = accept_grant(identity(2), Grant.from_bytes(bytes.fromhex(vector["grant"])))
    except FieldchatError:
        return False
    return granted == ChainGrant.from_bytes(bytes.fromhex(vector["payload"]))


def _delivery_opens(vector: dict[str, Any]) -> bool:
    try:
        secret = open_delivery(identity(2), Delivery.from_bytes(bytes.fromhex(vector["delivery"])))
    except FieldchatError:
        return False
    return secret.hex() == vector["epoch_secret"]


def main() -> None:
    previous = json.loads(PATH.read_text()) if PATH.exists() else None
    grant = previous["grants"][1]["grant"] if previous else None
    delivery = previous.get("deliveries", [{}, {}])[1].get("delivery") if previous else None
    vectors = build(grant, delivery)
    # A payload that changed, or a recipient whose prekey changed: record new ones.
    if not _opens(vectors["grants"][1]):
        grant = None
    if not _delivery_opens(vectors["deliveries"][1]):
        delivery = None
    vectors = build(grant, delivery)
    PATH.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
