"""Key grants: a chain key sealed to one member with the hybrid KEM (PROTOCOL.md §5.3).

The sealing is :func:`~fieldchat.schemas.crypto.hybrid_seal` (X25519 + ML-KEM-768,
one combiner for every key delivery, the browser's included), bound to the grant's
context ``msgpack[mode, cid, granter_key, recipient]``; the whole grant is then signed
by the granter. Hybrid when the recipient's bundle has an ML-KEM key, X25519 only when
it has none (rosters mark such members, and a policy that requires post-quantum
protection admits none).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fieldchat.device.identity import Identity
from fieldchat.schemas import Bundle, ChainGrant, Grant, GrantMode
from fieldchat.schemas.crypto import HybridSealed, hybrid_open, hybrid_seal
from fieldchat.schemas.errors import GrantRejected

__all__ = ["accept_grant", "make_grant"]


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
    out = hybrid_seal(
        x25519_public=recipient.x25519,
        mlkem768_public=recipient.mlkem768,
        context=Grant.context(mode, cid, granter.public, recipient.pid),
        plaintext=payload.to_bytes(),
        random=random,
    )
    return Grant.create(
        mode=mode,
        cid=cid,
        granter_key=granter.public,
        recipient=recipient.pid,
        ephemeral=out.ephemeral,
        kem_ciphertext=out.kem_ciphertext,
        sealed=out.sealed,
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
    if grant.mode is GrantMode.HYBRID and recipient.mlkem_seed is None:
        raise GrantRejected("hybrid grant but this participant has no ML-KEM key")
    plaintext = hybrid_open(
        x25519_private=recipient.x25519_private,
        mlkem768_seed=recipient.mlkem_seed,
        x25519_public=recipient.bundle.x25519,
        mlkem768_public=recipient.bundle.mlkem768,
        message=HybridSealed(grant.ephemeral, grant.kem_ciphertext, grant.sealed),
        context=Grant.context(grant.mode, grant.cid, grant.granter_key, grant.recipient),
    )
    return ChainGrant.from_bytes(plaintext)
