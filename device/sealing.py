"""The hybrid KEM that seals deliveries and grants to a recipient's prekey
(PROTOCOL.md §5.3-§5.4): one function to seal, one to open.

    ss_x         = X25519(ephemeral_private, prekey.x25519)          refuse all-zero
    ss_k, kem_ct = ML-KEM-768.Encaps(prekey.mlkem768)                 hybrid only
    th           = SHA-256(header(mode, ephemeral, kem_ct) || prekey.x25519
                           || prekey.mlkem768)
    key || nonce = HKDF-SHA256(ss_x || ss_k, salt = label, info = th, 44)
    sealed       = AES-256-GCM(key, nonce, plaintext, aad = th)

``header`` is the object's public part (who, to whom, which prekey, what for), so the
key is bound to the whole transcript, as X-Wing and the TLS hybrid drafts bind theirs:
breaking a hybrid seal needs both X25519 and ML-KEM-768 broken. The combiner is this
module's alone, so replacing it (issue 16 item 4: one combiner in Python and JS with
shared vectors) changes one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from fieldchat.schemas import GrantMode
from fieldchat.schemas.bundle import Prekey
from fieldchat.schemas.crypto import (
    aead_open,
    aead_seal,
    hkdf_sha256,
    mlkem768_decapsulate,
    mlkem768_encapsulate,
    sha256,
    x25519_exchange,
    x25519_public_from_private,
)
from fieldchat.schemas.errors import CryptoError, GrantRejected

__all__ = ["Header", "Sealed", "open_from_prekey", "seal_to_prekey"]

Header = Callable[[GrantMode, bytes, bytes | None], bytes]
"""``(mode, ephemeral, kem_ciphertext) -> bytes``: the object's public part."""


@dataclass(frozen=True, slots=True)
class Sealed:
    mode: GrantMode
    ephemeral: bytes
    kem_ciphertext: bytes | None
    sealed: bytes


def _key(shared: bytes, label: bytes, th: bytes) -> tuple[bytes, bytes]:
    okm = hkdf_sha256(shared, salt=label, info=th, length=44)
    return okm[:32], okm[32:]


def _transcript(header: bytes, prekey: Prekey) -> bytes:
    return sha256(header + prekey.x25519 + (prekey.mlkem768 or b""))


def seal_to_prekey(
    prekey: Prekey,
    plaintext: bytes,
    *,
    label: bytes,
    header: Header,
    random: Callable[[int], bytes] = os.urandom,
) -> Sealed:
    """Seal ``plaintext`` to ``prekey``: hybrid when it has ML-KEM, else X25519 only.

    Raises:
        WeakKey: the prekey is unusable (low-order point, bad ML-KEM key).
    """
    mode = GrantMode.HYBRID if prekey.mlkem768 is not None else GrantMode.X25519
    ephemeral_private = random(32)
    ephemeral = x25519_public_from_private(ephemeral_private)
    shared = x25519_exchange(ephemeral_private, prekey.x25519)
    kem_ct = None
    if prekey.mlkem768 is not None:
        ss_k, kem_ct = mlkem768_encapsulate(prekey.mlkem768)
        shared += ss_k
    th = _transcript(header(mode, ephemeral, kem_ct), prekey)
    key, nonce = _key(shared, label, th)
    return Sealed(mode, ephemeral, kem_ct, aead_seal(key, nonce, plaintext, th))


def open_from_prekey(
    prekey: Prekey,
    x25519_private: bytes,
    mlkem_seed: bytes | None,
    sealed: Sealed,
    *,
    label: bytes,
    header: Header,
    x25519_ok: bool = False,
) -> bytes:
    """Open what :func:`seal_to_prekey` sealed to ``prekey`` (whose private parts are given).

    ``x25519_ok``: an X25519-only seal to a prekey with ML-KEM is accepted (its sender
    has no ML-KEM: a browser without it, which the roster shows, PROTOCOL.md §5.3).

    Raises:
        GrantRejected: the mode does not match the prekey (an X25519-only seal to a
            prekey with ML-KEM is a downgrade; a hybrid one to a prekey without it).
        WeakKey: the ephemeral key is a low-order point.
        CryptoError: it does not decrypt (opaque).
    """
    hybrid = sealed.mode is GrantMode.HYBRID
    if hybrid and mlkem_seed is None:
        raise GrantRejected("a hybrid seal to a prekey without ML-KEM")
    if not hybrid and mlkem_seed is not None and not x25519_ok:
        raise GrantRejected("X25519-only seal to a post-quantum prekey (downgrade)")
    shared = x25519_exchange(x25519_private, sealed.ephemeral)
    # The wire models give a hybrid seal its ciphertext, and only a hybrid seal has one.
    if mlkem_seed is not None and sealed.kem_ciphertext is not None:
        shared += mlkem768_decapsulate(mlkem_seed, sealed.kem_ciphertext)
    th = _transcript(header(sealed.mode, sealed.ephemeral, sealed.kem_ciphertext), prekey)
    key, nonce = _key(shared, label, th)
    try:
        return aead_open(key, nonce, sealed.sealed, th)
    except CryptoError:
        raise CryptoError("authentication failed") from None
