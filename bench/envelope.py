"""Envelope size and seal/open cost against the bare primitives, measured in one run.

Prints one JSON object on its last line (keys of issues 2 and 13; results in
BENCHMARKS.md). Usage: python bench/envelope.py [--rounds N]

Each ratio is the median over rounds of (a batch of ours / the baseline batch timed
right after it), so drift on a shared machine cancels out of it.

``worst_preauth_envelope_ms`` (issue 13, item 5) is the largest of the ``preauth_*``
cases: the receiving engine's CPU time (this thread's, so other processes do not
count) for one envelope that nothing has authenticated, median over repeated trials,
each from the state that makes it dearest (PROTOCOL.md §6.4).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# bench/device.py would shadow the ``device`` package: import from the project root.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fieldchat.device.chains import MAX_UNSIGNED_JUMP
from fieldchat.device.engine import Engine
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.schemas import ChainGrant, FieldchatError, Member, Policy, Roster, TextMessage
from fieldchat.schemas.envelope import MAX_ENVELOPE_BYTES, EnvelopeKind, header_bytes
from fieldchat.schemas.frame import MAX_FRAME_ENVELOPES, pack_frame, split
from fieldchat.schemas.roster import MAX_MEMBERS

TEXT = "Pump 3 pressure 4.2 bar, valve B closed, back on site at 14:30"[:60].ljust(60, ".")


def median_us(fn: Callable[[], object], rounds: int, batch: int = 50) -> float:
    """Median over ``rounds`` batches of the per-call time in microseconds."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def delayed_authentication(message: TextMessage, plain_len: int, rounds: int) -> dict[str, float]:
    """Delayed authentication (issue 16, item 5; PROTOCOL.md §6.5) with sign_every = 8:
    the bytes of a covered unsigned envelope and of the signed one covering seven (its
    cover byte counted), and seal + open per message over whole windows of 8, against
    the same stream with sign_every = 0 and = 1 timed in the same rounds."""
    a, b, cid = pair(Policy(sign_every=8))
    window = [a.seal(cid, message) for _ in range(9)]
    out: dict[str, float] = {
        "overhead_covered_unsigned_bytes": len(window[1]) - plain_len,
        "overhead_covering_signed_bytes": len(window[8]) - plain_len,
    }
    for e in window:
        b.open(cid, e)
    assert [s.verdict.value for s in b.take_settled()] == ["verified"]

    def stream(a: Engine, b: Engine, cid: str) -> Callable[[], None]:
        def run() -> None:
            for _ in range(8):
                b.open(cid, a.seal(cid, message))
            b.take_settled()

        return run

    for every in (8, 0, 1):
        a, b, cid = pair(Policy(sign_every=every))
        per_window = median_us(stream(a, b, cid), max(5, rounds // 5), batch=10)
        out[f"seal_open_every{every}_us"] = round(per_window / 8, 2)
    return out


def pair(policy: Policy) -> tuple[Engine, Engine, str]:
    a, b = Engine(Identity.generate()), Engine(Identity.generate())
    a.learn_bundle(b.identity.bundle.to_bytes())
    b.learn_bundle(a.identity.bundle.to_bytes())
    cid, pubs = a.create_conversation([b.pid], policy=policy)
    more = []
    for pub in pubs:
        if pub.topic.endswith("/propose"):
            more += b.handle_roster(pub.payload)
        elif pub.topic.endswith(f"{b.pid}/inbox"):
            b.handle_grant(pub.payload)
    for pub in more:
        a.handle_grant(pub.payload)
    return a, b, cid


def paired(
    ours: Callable[[], object], base: Callable[[], object], rounds: int, batch: int = 50
) -> tuple[float, float, float]:
    """Alternate batches of ``ours`` and ``base``: medians of each and of their ratio.

    Pairing each batch with a baseline batch taken right after it keeps a noisy,
    shared machine's drift (other processes waking up) out of the ratio.
    """
    mine, theirs, ratios = [], [], []
    for _ in range(rounds):
        a = median_us(ours, 1, batch)
        b = median_us(base, 1, batch)
        mine.append(a)
        theirs.append(b)
        ratios.append(a / b)
    return statistics.median(mine), statistics.median(theirs), statistics.median(ratios)


def cpu_ms(
    fn: Callable[[], object], trials: int, reset: Callable[[], object] = lambda: None
) -> float:
    """Median over ``trials`` of this thread's CPU time for ``fn`` (refusals expected),
    ``reset`` run before each trial, outside the measurement."""
    samples = []
    for _ in range(trials):
        reset()
        start = time.thread_time()
        with contextlib.suppress(FieldchatError):
            fn()
        samples.append((time.thread_time() - start) * 1e3)
    return statistics.median(samples)


def junk(index: int, step: int, size: int = 54, *, signature: bytes = b"") -> bytes:
    """A well-formed envelope of member ``index``'s epoch-0 chain that nobody sealed;
    with ``signature`` (64 bytes) a signed one."""
    head = header_bytes(EnvelopeKind.TEXT, 0, index, 0, step, signed=bool(signature))
    return head + os.urandom(size - len(head) - len(signature)) + signature


def preauth(trials: int) -> dict[str, float]:
    """Receiver CPU for one unauthenticated envelope, in the worst cases known."""
    a, b, cid = pair(Policy(sign_every=0))
    index = b.roster(cid).index_of(a.pid)
    chain = b._convs[cid].recv[(0, index, 0)]

    def forget_cache() -> None:  # a receiver that never derived ahead: the dearest state
        chain.marks.clear()

    far = junk(index, 24_999)  # 54 bytes, 24,999 steps ahead: issue 13's envelope
    reachable = junk(index, chain.step + MAX_UNSIGNED_JUMP)  # derived to, AES-GCM fails
    largest = junk(index, chain.step, MAX_ENVELOPE_BYTES)  # AES-GCM over 64 KiB fails
    spread = range(chain.step + MAX_UNSIGNED_JUMP, chain.step + 25_000, 390)
    frame = pack_frame([junk(index, s) for s in spread][:MAX_FRAME_ENVELOPES])

    def open_frame() -> None:
        for envelope in split(frame):
            with contextlib.suppress(FieldchatError):
                b.open(cid, envelope)

    a2, b2, cid2 = pair(Policy())  # signed: the signature is checked before any step
    index2 = b2.roster(cid2).index_of(a2.pid)
    # A real signature of the sender over other bytes: canonical, so the verification
    # runs to the end before it fails (random bytes are refused at once).
    other = a2.identity.sign(b"other bytes")
    signed_far = junk(index2, 24_999, 118, signature=other)
    signed_largest = junk(index2, 0, MAX_ENVELOPE_BYTES, signature=other)
    out = {
        "preauth_far_unsigned_ms": cpu_ms(lambda: b.open(cid, far), trials, forget_cache),
        "preauth_reachable_junk_ms": cpu_ms(lambda: b.open(cid, reachable), trials, forget_cache),
        "preauth_largest_bad_tag_ms": cpu_ms(lambda: b.open(cid, largest), trials),
        "preauth_far_signed_bad_signature_ms": cpu_ms(lambda: b2.open(cid2, signed_far), trials),
        "preauth_largest_signed_bad_signature_ms": cpu_ms(
            lambda: b2.open(cid2, signed_largest), trials
        ),
        # 64 junk envelopes, each further than the last (each extends the cache)
        "preauth_frame_per_envelope_ms": cpu_ms(open_frame, max(3, trials // 10), forget_cache)
        / MAX_FRAME_ENVELOPES,
    }
    return {k: round(v, 3) for k, v in out.items()}


def preauth_objects(trials: int) -> dict[str, float]:
    """Grants and rosters refused or held before anything is trusted (not envelopes)."""
    me = Identity.generate()
    engine = Engine(me)
    stranger = Identity.generate()
    payload = ChainGrant(epoch=0, roster=bytes(32), sender=0, chain=1, step=0, key=bytes(32))
    grant = make_grant(stranger, me.bundle, "a" * 26, payload).to_bytes()  # signed, hybrid
    others = tuple(Member(key=i.to_bytes(32, "big")) for i in range(1, MAX_MEMBERS))
    rosters = [
        Roster.create(
            cid="a" * 26,
            epoch=7 + i,
            nonce=b"",
            prev=bytes(32),
            members=(Member(key=stranger.public, admin=True), *others),
            policy=Policy(),
            issued_at=0,
            signer_key=stranger.public,
            commit=bytes(32),
            sign=stranger.sign,
        ).to_bytes()
        for i in range(trials)
    ]
    forged = rosters[0][:-1] + bytes([rosters[0][-1] ^ 1])
    held = iter(rosters)
    return {
        # a stranger's grant for a conversation we are not in: both key agreements run
        # (the signature proves only the stranger's own key), then it is held (bounded)
        "preauth_grant_ms": round(cpu_ms(lambda: engine.handle_grant(grant), trials), 3),
        # a 256-member roster with a bad signature; one held for lack of its chain
        "preauth_roster_bad_signature_ms": round(
            cpu_ms(lambda: engine.handle_roster(forged), trials), 3
        ),
        "preauth_roster_held_ms": round(
            cpu_ms(lambda: engine.handle_roster(next(held)), trials), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    rounds = parser.parse_args().rounds
    assert len(TEXT) == 60
    message = TextMessage(sent_at=int(time.time()), text=TEXT)
    plain_len = len(TEXT.encode())

    # Bare primitives over bytes of the same sizes: the encoded text (68 bytes) and the
    # associated data (header and cid, 22 bytes). Every envelope has its own AES-256
    # key, so the baseline is one-shot AES-GCM: key schedule + encrypt on one side, key
    # schedule + decrypt on the other. The cached-key figure is printed for reference.
    data, aad = os.urandom(plain_len + 8), os.urandom(22)
    key, nonce = os.urandom(32), os.urandom(12)
    aes = AESGCM(key)
    signer = Ed25519PrivateKey.generate()
    verifier = signer.public_key()

    def bare_aes() -> None:
        AESGCM(key).decrypt(nonce, AESGCM(key).encrypt(nonce, data, aad), aad)

    def bare_aes_cached() -> None:
        aes.decrypt(nonce, aes.encrypt(nonce, data, aad), aad)

    def bare_signed() -> None:
        sealed = AESGCM(key).encrypt(nonce, data, aad)
        verifier.verify(signer.sign(sealed), sealed)
        AESGCM(key).decrypt(nonce, sealed, aad)

    results: dict[str, float | int] = {}
    baselines = {
        "signed": ("primitives_signed_us", bare_signed, "ratio_signed_vs_primitives"),
        "unsigned": ("aesgcm_us", bare_aes, "ratio_unsigned_vs_aesgcm"),
    }
    for label, policy in (("signed", Policy()), ("unsigned", Policy(sign_every=0))):
        a, b, cid = pair(policy)
        envelope = a.seal(cid, message)
        results[f"overhead_{label}_bytes"] = len(envelope) - plain_len

        def seal_open(a: Engine = a, b: Engine = b, cid: str = cid) -> None:
            opened = b.open(cid, a.seal(cid, message))
            assert opened is not None

        base_key, base, ratio_key = baselines[label]
        ours_us, base_us, ratio = paired(seal_open, base, rounds if label == "unsigned" else 30)
        results[f"seal_open_{label}_us"] = round(ours_us, 2)
        results[base_key] = round(base_us, 2)
        results[ratio_key] = round(ratio, 3)
    results["aesgcm_cached_key_us"] = round(median_us(bare_aes_cached, rounds), 2)
    results |= delayed_authentication(message, plain_len, rounds)

    granter, recipient = Identity.generate(), Identity.generate()
    payload = ChainGrant(epoch=0, roster=bytes(32), sender=0, chain=0, step=0, key=os.urandom(32))

    def grant() -> None:
        accept_grant(recipient, make_grant(granter, recipient.bundle, "a" * 26, payload))

    results["grant_hybrid_us"] = round(median_us(grant, max(5, rounds // 10), batch=10), 1)
    cases = preauth(max(20, rounds))
    results |= cases
    results["worst_preauth_envelope_ms"] = max(cases.values())
    results |= preauth_objects(max(10, rounds // 5))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
