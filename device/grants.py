"""Key grants: a chain key sealed to one member with a hybrid KEM (PROTOCOL.md §5.3).

    ss_x            = X25519(ephemeral, recipient.x25519)
    ss_k, kem_ct    = ML-KEM-768.Encaps(recipient.mlkem768)          (hybrid mode only)
    transcript      = msgpack[mode, cid, granter_key, recipient, ephemeral, kem_ct]
                      || recipient.x25519 || recipient.mlkem768
    key || nonce    = HKDF-SHA256(ikm = ss_x || ss_k, salt = "fieldchat grant v1",
                                  info = SHA-256(transcript), 44)
    sealed          = AES-256-GCM(key, nonce, ChainGrant, aad = SHA-256(transcript))

The whole grant is then signed by the granter. Breaking it needs both X25519 and
ML-KEM-768 broken (the combiner hashes both secrets with everything they depend on,
as X-Wing does), so a recording made today stays safe against a future quantum
computer for members with ML-KEM keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fieldchat.device.identity import Identity
from fieldchat.schemas import Bundle, ChainGrant, Grant, GrantMode
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

__all__ = ["accept_grant", "make_grant"]

_SALT = b"fieldchat grant v1"


def _derive(shared: bytes, transcript_hash: bytes) -> tuple[bytes, bytes]:
    okm = hkdf_sha256(shared, salt=_SALT, info=transcript_hash, length=44)
    return okm[:32], okm[32:]


def _transcript(
    mode: GrantMode,
    cid: str,
    granter_key: bytes,
    recipient: Bundle | Identity,
    ephemeral: bytes,
    kem_ct: bytes | None,
) -> bytes:
    bundle = recipient if isinstance(recipient, Bundle) else recipient.bundle
    return sha256(
        Grant.header_body(mode, cid, granter_key, bundle.pid, ephemeral, kem_ct)
        + bundle.x25519
        + (bundle.mlkem768 or b"")
    )


def make_grant(
    granter: Identity,
    recipient: Bundle,
    cid: str,
    payload: ChainGrant,
    *,
    random: Callable[[int], bytes] = os.urandom,
) -> Grant:
    """Seal ``payload`` to ``recipient``: hybrid when it has ML-KEM, else X25519 only.

    Raises:
        WeakKey: the recipient's keys are unusable (low-order point, bad ML-KEM key).
    """
    mode = GrantMode.HYBRID if recipient.mlkem768 is not None else GrantMode.X25519
    ephemeral_private = random(32)
    ephemeral = x25519_public_from_private(ephemeral_private)
    shared = x25519_exchange(ephemeral_private, recipient.x25519)
    kem_ct = None
    if recipient.mlkem768 is not None:
        ss_k, kem_ct = mlkem768_encapsulate(recipient.mlkem768)
        shared += ss_k
    th = _transcript(mode, cid, granter.public, recipient, ephemeral, kem_ct)
    key, nonce = _derive(shared, th)
    return Grant.create(
        mode=mode,
        cid=cid,
        granter_key=granter.public,
        recipient=recipient.pid,
        ephemeral=ephemeral,
        kem_ciphertext=kem_ct,
        sealed=aead_seal(key, nonce, payload.to_bytes(), th),
        sign=granter.sign,
    )


def accept_grant(recipient: Identity, grant: Grant) -> ChainGrant:
    """Open a grant addressed to ``recipient`` (its signature was checked on decode).

    Raises:
        GrantRejected: addressed to someone else, or hybrid without our ML-KEM key.
        WeakKey: the ephemeral key is a low-order point.
        CryptoError: it does not decrypt (opaque).
        WireError: the decrypted payload is malformed.
    """
    if grant.recipient != recipient.pid:
        raise GrantRejected("grant addressed to another participant")
    shared = x25519_exchange(recipient.x25519_private, grant.ephemeral)
    if grant.mode is GrantMode.HYBRID:
        if recipient.mlkem_seed is None or grant.kem_ciphertext is None:
            raise GrantRejected("hybrid grant but this participant has no ML-KEM key")
        shared += mlkem768_decapsulate(recipient.mlkem_seed, grant.kem_ciphertext)
    th = _transcript(
        grant.mode, grant.cid, grant.granter_key, recipient, grant.ephemeral, grant.kem_ciphertext
    )
    key, nonce = _derive(shared, th)
    try:
        plaintext = aead_open(key, nonce, grant.sealed, th)
    except CryptoError:
        raise CryptoError("authentication failed") from None
    return ChainGrant.from_bytes(plaintext)
