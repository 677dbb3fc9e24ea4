"""Generate the protocol test vectors from fixed seeds (PROTOCOL.md §9).

    python -m tests.vectors.generate          # rewrites tests/vectors/protocol.json

Everything is deterministic (seeded randomness, fixed clock, deterministic Ed25519
and AES-GCM) except ML-KEM encapsulation, whose randomness ``cryptography`` does not
let us inject: hybrid grants are recorded once and checked by opening them (and
recorded again when the recorded one no longer opens to the current payload).
The browser client checks the same file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fieldchat.device._coverage import MAX_COVER_TRIES
from fieldchat.device.chains import (
    MARK_EVERY,
    MAX_FORWARD_JUMP,
    MAX_UNSIGNED_JUMP,
    nonce,
    step_keys,
)
from fieldchat.device.engine import KEEP_EPOCHS, Engine
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.schemas import ChainGrant, FieldchatError, Grant, Member, Policy, Roster, TextMessage
from fieldchat.schemas.crypto import chain_step
from fieldchat.schemas.envelope import MAX_COVER, coverage_digest, envelope_digest, read_header
from fieldchat.schemas.frame import pack_frame
from fieldchat.schemas.grant import MAX_CHAIN_ENDS, ChainEnd

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
    return Identity.from_seed(bytes([tag]) * 32, created_at=CLOCK, post_quantum=post_quantum)


def _identity_vector(name: str, tag: int, ident: Identity) -> dict[str, Any]:
    b = ident.bundle
    return {
        "name": name,
        "seed": (bytes([tag]) * 32).hex(),
        "post_quantum": b.post_quantum,
        "pid": ident.pid,
        "ed25519_public": b.ed25519.hex(),
        "x25519_public": b.x25519.hex(),
        "mlkem768_public_sha256": hashlib.sha256(b.mlkem768).hexdigest() if b.mlkem768 else None,
        "bundle": b.to_bytes().hex(),
        "fingerprint": b.fingerprint(),
    }


def build(hybrid_grant: str | None = None) -> dict[str, Any]:
    """The vectors; ``hybrid_grant`` reuses a recorded hybrid grant (hex) if given."""
    alice, bob, web = identity(1), identity(2), identity(3, post_quantum=False)
    out: dict[str, Any] = {
        "about": "fieldchat protocol vectors v1; see PROTOCOL.md §9. All byte strings are hex.",
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
        # Every third step signed: step 3 covers the unsigned steps 1 and 2 (§6.5).
        "every_third": Policy(sign_every=3),
    }
    for label, policy in policies.items():
        engine = Engine(alice, clock=lambda: CLOCK, random=SeededRandom(label.encode()))
        for other in (bob, web):
            engine.learn_bundle(other.bundle.to_bytes())
        cid, pubs = engine.create_conversation([bob.pid, web.pid], policy=policy)
        roster = engine.roster(cid)
        conv = engine._convs[cid]
        assert conv.send is not None
        chain_key = conv.send.key
        web_grant = next(p for p in pubs if p.topic.endswith(f"{web.pid}/inbox"))
        conversations.append(
            {
                "label": label,
                "cid": cid,
                "roster": roster.to_bytes().hex(),
                "creator": "alice",
                "sender_chain_key": chain_key.hex(),
                "grant_to_web_x25519": web_grant.payload.hex(),
            }
        )
        texts = ["hello", "Pump 3 at 4.2 bar; valve B closed. Back on site 14:30 ✓", "x" * 300]
        if policy.sign_every > 1:
            texts.append("covers the two before")
        sealed_so_far: list[bytes] = []
        for i, text in enumerate(texts):
            sealed = engine.seal(cid, TextMessage(sent_at=CLOCK + i, text=text))
            header = read_header(sealed)
            kind, flags, epoch, sender, chain, step, hlen = header
            cover = header.cover(sealed)
            covered = sealed_so_far[len(sealed_so_far) - cover :] if cover else []
            sealed_so_far.append(sealed)
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
                    # Signed only: how many unsigned steps before it it covers, and the
                    # digest its associated data ends with (header || cid || coverage).
                    "cover": cover,
                    "coverage": coverage_digest([envelope_digest(e) for e in covered]).hex(),
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
        epoch=3, roster=bytes(32), sender=0, chain=0, step=5, key=bytes(32), ends=ends
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
    out["limits"] = {
        "keep_epochs": KEEP_EPOCHS,
        "max_chain_ends": MAX_CHAIN_ENDS,
        "max_forward_jump": MAX_FORWARD_JUMP,
        "max_unsigned_jump": MAX_UNSIGNED_JUMP,
        "mark_every": MARK_EVERY,
        "max_cover": MAX_COVER,
        "max_cover_tries": MAX_COVER_TRIES,
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
        members=(Member(pid=member.pid, admin=True, pq=True),),
        policy=rosters[1].policy,
        issued_at=CLOCK,
        signer_key=member.bundle.ed25519,
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


def main() -> None:
    previous = json.loads(PATH.read_text()) if PATH.exists() else None
    recorded = previous["grants"][1]["grant"] if previous else None
    vectors = build(recorded)
    if not _opens(vectors["grants"][1]):  # the payload changed: record a new one
        vectors = build(None)
    PATH.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
