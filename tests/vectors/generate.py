"""Generate the protocol test vectors from fixed seeds (PROTOCOL.md §9).

    python -m tests.vectors.generate          # rewrites tests/vectors/protocol.json

Everything is deterministic (seeded randomness, fixed clock, deterministic Ed25519
and AES-GCM) except ML-KEM encapsulation, whose randomness ``cryptography`` does not
let us inject: what it makes (hybrid grants and deliveries, hybrid KEM outputs) is
recorded once and checked by opening it (and recorded again when the recorded one no
longer opens to the current payload). Prekeys come from seeded randomness, as an
identity's never derive from its seed (PROTOCOL.md §2.4).
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
from fieldchat.device.epochs import chain_key, epoch_commit, make_delivery, open_delivery
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.schemas import ChainGrant, FieldchatError, Grant, Member, Policy, Roster, TextMessage
from fieldchat.schemas.crypto import (
    HYBRID_LABEL,
    HybridSealed,
    chain_step,
    hkdf_sha256,
    hybrid_open,
    hybrid_seal,
    mlkem768_decapsulate,
    sha256,
    x25519_exchange,
    x25519_public_from_private,
)
from fieldchat.schemas.delivery import Delivery
from fieldchat.schemas.envelope import MAX_COVER, coverage_digest, envelope_digest, read_header
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


def _hybrid_vector(
    name: str, tag: int, context: bytes, plaintext: bytes, recorded: dict[str, str]
) -> dict[str, Any]:
    """One output of the hybrid KEM (PROTOCOL.md §5.3) to identity ``tag``, with every
    intermediate value; the X25519 ephemeral is seeded, an ML-KEM ciphertext recorded."""
    recipient = identity(tag, post_quantum=tag != 3)
    bundle = recipient.bundle.prekey
    held = recipient.current
    eph_private = SeededRandom(name.encode())(32)
    kem = bundle.mlkem768
    made = None
    if name in recorded:
        kem_ct, sealed = (bytes.fromhex(x) for x in recorded[name].split(":"))
        made = HybridSealed(x25519_public_from_private(eph_private), kem_ct, sealed)
        try:
            opens = hybrid_open(
                x25519_private=held.x25519_private,
                mlkem768_seed=held.mlkem_seed,
                x25519_public=bundle.x25519,
                mlkem768_public=kem,
                message=made,
                context=context,
            )
        except FieldchatError:
            opens = None
        made = made if opens == plaintext else None
    if made is None:
        made = hybrid_seal(
            x25519_public=bundle.x25519,
            mlkem768_public=kem,
            context=context,
            plaintext=plaintext,
            random=SeededRandom(name.encode()),
        )
    ss_x = x25519_exchange(eph_private, bundle.x25519)
    ss_k = b""
    if made.kem_ciphertext is not None and held.mlkem_seed is not None:
        ss_k = mlkem768_decapsulate(held.mlkem_seed, made.kem_ciphertext)
    # The combiner spelled out again (schemas.crypto._hybrid_keys): the vector shows
    # each value a second implementation must reach.
    th = sha256(
        (b"\x01" if kem else b"\x02")
        + made.ephemeral
        + (made.kem_ciphertext or b"")
        + bundle.x25519
        + (kem or b"")
        + context
    )
    okm = hkdf_sha256(ss_x + ss_k, salt=HYBRID_LABEL, info=th, length=44)
    return {
        "name": name,
        "mode": "hybrid" if kem else "x25519",
        "recipient_seed": (bytes([tag]) * 32).hex(),
        "x25519_public": bundle.x25519.hex(),
        "mlkem768_public_sha256": sha256(kem).hex() if kem else None,
        "context": context.hex(),
        "plaintext": plaintext.hex(),
        "ephemeral_private": eph_private.hex(),
        "ephemeral": made.ephemeral.hex(),
        "kem_ciphertext": made.kem_ciphertext.hex() if made.kem_ciphertext else None,
        "ss_x25519": ss_x.hex(),
        "ss_mlkem768": ss_k.hex() if kem else None,
        "transcript_hash": th.hex(),
        "key": okm[:32].hex(),
        "nonce": okm[32:].hex(),
        "sealed": made.sealed.hex(),
        "deterministic": kem is None,
    }


def _recorded_grant(
    recorded: dict[str, str], name: str, recipient: Identity, payload: ChainGrant
) -> str:
    """A recorded hybrid grant to ``recipient`` if it still opens to ``payload``, else a new one."""
    if name in recorded and _opens(recipient, recorded[name], payload):
        return recorded[name]
    return make_grant(identity(1), recipient.bundle, "a" * 26, payload).to_bytes().hex()


def _recorded_delivery(
    recorded: dict[str, str], name: str, recipient: Identity, secret: bytes
) -> str:
    """A recorded hybrid delivery to ``recipient`` if it opens to ``secret``, else a new one."""
    if name in recorded and _delivery_opens(recipient, recorded[name], secret):
        return recorded[name]
    return make_delivery(secret, recipient.bundle, "a" * 26, 3).to_bytes().hex()


def recorded_of(vectors: dict[str, Any]) -> dict[str, str]:
    """What a vector file recorded (the ML-KEM outputs), by name, for :func:`build`."""
    grants = vectors.get("grants", [])
    out = {g["name"]: g["grant"] for g in grants if "name" in g and not g["deterministic"]}
    for d in vectors.get("deliveries", []):
        if "name" in d and not d["deterministic"]:
            out[d["name"]] = d["delivery"]
    for h in vectors.get("hybrid_kem", []):
        if not h["deterministic"]:
            out[h["name"]] = f"{h['kem_ciphertext']}:{h['sealed']}"
    return out


def build(recorded: dict[str, str] | None = None) -> dict[str, Any]:
    """The vectors; ``recorded`` (from :func:`recorded_of`) reuses ML-KEM outputs."""
    recorded = recorded or {}
    alice, bob, web = identity(1), identity(2), identity(3, post_quantum=False)
    web_pq = identity(4)
    out: dict[str, Any] = {
        "about": "fieldchat protocol vectors v2; see PROTOCOL.md §9. All byte strings are hex.",
        "identities": [
            _identity_vector("alice", 1, alice),
            _identity_vector("bob", 2, bob),
            _identity_vector("web", 3, web),
            _identity_vector("web_pq", 4, web_pq),
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
    # The member "web" has no ML-KEM (a browser without it: the X25519 fallback, whose
    # grants are deterministic), so these policies admit it: require_pq is off.
    policies = {
        "signed": Policy(require_pq=False),
        "unsigned_compressed_padded": Policy(
            sign_every=0, compress=True, pad=True, require_pq=False
        ),
        # Every third step signed: step 3 covers the unsigned steps 1 and 2 (§6.5).
        "every_third": Policy(sign_every=3, require_pq=False),
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
        epoch=3, roster=bytes(32), sender=0, chain=1, step=5, key=bytes(32), ends=ends
    )
    x_grant = make_grant(alice, web.bundle, "a" * 26, payload, random=SeededRandom(b"grant"))
    out["grants"] = [
        {
            "name": "x25519 to web",
            "mode": "x25519",
            "granter": "alice",
            "recipient": "web",
            "cid": "a" * 26,
            "ephemeral_private": SeededRandom(b"grant")(32).hex(),
            "payload": payload.to_bytes().hex(),
            "grant": x_grant.to_bytes().hex(),
            "deterministic": True,
        },
        *(
            {
                "name": f"hybrid to {name}",
                "mode": "hybrid",
                "granter": "alice",
                "recipient": name,
                "cid": "a" * 26,
                "payload": payload.to_bytes().hex(),
                "grant": _recorded_grant(recorded, f"hybrid to {name}", who, payload),
                "deterministic": False,
            }
            for name, who in (("bob", bob), ("web_pq", web_pq))
        ),
    ]
    # The hybrid KEM alone (§5.3), both modes, with every intermediate value.
    context = b"fieldchat vector context"
    out["hybrid_kem"] = [
        _hybrid_vector("hybrid kem to web_pq", 4, context, b"a secret for the browser", recorded),
        _hybrid_vector("x25519 kem to web", 3, context, b"a secret, X25519 only", recorded),
    ]
    # Epoch secrets sealed to a prekey (§5.3): X25519 (deterministic) and hybrid.
    secret = bytes(range(100, 132))
    x_delivery = make_delivery(secret, web.bundle, "a" * 26, 3, random=SeededRandom(b"delivery"))
    out["deliveries"] = [
        {
            "name": "x25519 delivery to web",
            "mode": "x25519",
            "recipient": "web",
            "cid": "a" * 26,
            "epoch": 3,
            "ephemeral_private": SeededRandom(b"delivery")(32).hex(),
            "epoch_secret": secret.hex(),
            "delivery": x_delivery.to_bytes().hex(),
            "deterministic": True,
        },
        *(
            {
                "name": f"hybrid delivery to {name}",
                "mode": "hybrid",
                "recipient": name,
                "cid": "a" * 26,
                "epoch": 3,
                "epoch_secret": secret.hex(),
                "delivery": _recorded_delivery(recorded, f"hybrid delivery to {name}", who, secret),
                "deterministic": False,
            }
            for name, who in (("bob", bob), ("web_pq", web_pq))
        ),
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
    admin.set_policy(cid, Policy(pad=True, require_pq=False))
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


def _opens(recipient: Identity, grant: str, payload: ChainGrant) -> bool:
    try:
        return accept_grant(recipient, Grant.from_bytes(bytes.fromhex(grant))) == payload
    except FieldchatError:
        return False


def _delivery_opens(recipient: Identity, delivery: str, secret: bytes) -> bool:
    try:
        return open_delivery(recipient, Delivery.from_bytes(bytes.fromhex(delivery))) == secret
    except FieldchatError:
        return False


def main() -> None:
    previous = json.loads(PATH.read_text()) if PATH.exists() else {}
    vectors = build(recorded_of(previous))
    PATH.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
