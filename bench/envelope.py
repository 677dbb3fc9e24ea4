"""Envelope size and seal/open cost against the bare primitives, measured in one run.

Prints one JSON object on its last line (keys of issue 2; results in BENCHMARKS.md).
Usage: python bench/envelope.py [--rounds N]
"""

from __future__ import annotations

import argparse
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

from device.engine import Engine
from device.grants import accept_grant, make_grant
from device.identity import Identity
from schemas import ChainGrant, Policy, TextMessage

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


def pair(policy: Policy) -> tuple[Engine, Engine, str]:
    a, b = Engine(Identity.generate()), Engine(Identity.generate())
    a.learn_bundle(b.identity.bundle.to_bytes())
    b.learn_bundle(a.identity.bundle.to_bytes())
    cid, pubs = a.create_conversation([b.pid], policy=policy)
    more = []
    for pub in pubs:
        if pub.topic.endswith("/roster"):
            more += b.handle_roster(pub.payload)
        elif pub.topic.endswith(f"{b.pid}/inbox"):
            b.handle_grant(pub.payload)
    for pub in more:
        a.handle_grant(pub.payload)
    return a, b, cid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    rounds = parser.parse_args().rounds
    assert len(TEXT) == 60
    message = TextMessage(sent_at=int(time.time()), text=TEXT)
    plain_len = len(TEXT.encode())

    results: dict[str, float | int] = {}
    for label, policy in (("signed", Policy()), ("unsigned", Policy(sign_every=0))):
        a, b, cid = pair(policy)
        envelope = a.seal(cid, message)
        results[f"overhead_{label}_bytes"] = len(envelope) - plain_len

        def seal_open(a: Engine = a, b: Engine = b, cid: str = cid) -> None:
            opened = b.open(cid, a.seal(cid, message))
            assert opened is not None

        results[f"seal_open_{label}_us"] = round(median_us(seal_open, rounds), 2)

    # Bare primitives over the same bytes, same run. Every envelope has its own
    # AES-256 key, so the baseline is one-shot AES-GCM: key schedule + encrypt on one
    # side, key schedule + decrypt on the other. The cached-key figure is printed too.
    data = os.urandom(plain_len + 8)
    key, nonce = os.urandom(32), os.urandom(12)
    aes = AESGCM(key)
    signer = Ed25519PrivateKey.generate()
    verifier = signer.public_key()

    def bare_aes() -> None:
        AESGCM(key).decrypt(nonce, AESGCM(key).encrypt(nonce, data, b"h"), b"h")

    def bare_aes_cached() -> None:
        aes.decrypt(nonce, aes.encrypt(nonce, data, b"h"), b"h")

    def bare_signed() -> None:
        sealed = AESGCM(key).encrypt(nonce, data, b"h")
        verifier.verify(signer.sign(sealed), sealed)
        AESGCM(key).decrypt(nonce, sealed, b"h")

    aes_us = median_us(bare_aes, rounds)
    prim_us = median_us(bare_signed, rounds)
    results["aesgcm_us"] = round(aes_us, 2)
    results["aesgcm_cached_key_us"] = round(median_us(bare_aes_cached, rounds), 2)
    results["primitives_signed_us"] = round(prim_us, 2)
    results["ratio_signed_vs_primitives"] = round(results["seal_open_signed_us"] / prim_us, 3)
    results["ratio_unsigned_vs_aesgcm"] = round(results["seal_open_unsigned_us"] / aes_us, 3)

    granter, recipient = Identity.generate(), Identity.generate()
    payload = ChainGrant(epoch=0, roster=bytes(32), sender=0, chain=0, step=0, key=os.urandom(32))

    def grant() -> None:
        accept_grant(recipient, make_grant(granter, recipient.bundle, "a" * 26, payload))

    results["grant_hybrid_us"] = round(median_us(grant, max(5, rounds // 6), batch=10), 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
