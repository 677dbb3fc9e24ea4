"""Envelope size and seal/open cost against the bare primitives, measured in one run.

Prints one JSON object on its last line (keys of issue 2; results in BENCHMARKS.md).
Usage: python bench/envelope.py [--rounds N]

Each ratio is the median over rounds of (a batch of ours / the baseline batch timed
right after it), so drift on a shared machine cancels out of it.
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

    granter, recipient = Identity.generate(), Identity.generate()
    payload = ChainGrant(epoch=0, roster=bytes(32), sender=0, chain=0, step=0, key=os.urandom(32))

    def grant() -> None:
        accept_grant(recipient, make_grant(granter, recipient.bundle, "a" * 26, payload))

    results["grant_hybrid_us"] = round(median_us(grant, max(5, rounds // 10), batch=10), 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
