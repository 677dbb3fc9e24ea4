"""Key grants: a member's own re-keyed chain (chain >= 1) sealed to one member's
prekey with the hybrid KEM of :mod:`fieldchat.device.sealing` (PROTOCOL.md §5.4):
:func:`~fieldchat.schemas.crypto.hybrid_seal`, the one combiner of every key delivery.

The whole grant is signed by the granter: unlike chain 0, which comes from the epoch
secret that the roster commits to, a re-keyed chain is the member's own, and only its
signature says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fieldchat.device.identity import Identity
from fieldchat.device.sealing import Context, Sealed, open_with_held_prekey, seal_to_prekey
from fieldchat.schemas import Bundle, ChainGrant, Grant, GrantMode
from fieldchat.schemas.errors import GrantRejected

__all__ = ["accept_grant", "make_grant"]

_LABEL = b"fieldchat grant v2"


def _context(cid: str, granter_key: bytes, recipient: str, prekey_id: int) -> Context:
    def context(mode: GrantMode) -> bytes:
        return Grant.context(mode, cid, granter_key, recipient, prekey_id)

    return context


def make_grant(
    granter: Identity,
    recipient: Bundle,
    cid: str,
    payload: ChainGrant,
    *,
    random: Callable[[int], bytes] = os.urandom,
) -> Grant:
    """Seal ``payload`` to ``recipient``'s current prekey and sign it.

    Raises:
        WeakKey: the recipient's prekey is unusable (low-order point, bad ML-KEM key).
    """
    prekey = recipient.prekey
    sealed = seal_to_prekey(
        prekey,
        payload.to_bytes(),
        label=_LABEL,
        context=_context(cid, granter.public, recipient.pid, prekey.id),
        random=random,
    )
    return Grant.create(
        mode=sealed.mode,
        cid=cid,
        granter_key=granter.public,
        recipient=recipient.pid,
        prekey_id=prekey.id,
        ephemeral=sealed.ephemeral,
        kem_ciphertext=sealed.kem_ciphertext,
        sealed=sealed.sealed,
        sign=granter.sign,
    )


def accept_grant(recipient: Identity, grant: Grant, *, x25519_ok: bool = False) -> ChainGrant:
    """Open a grant addressed to ``recipient`` (its signature was checked on decode).
    ``x25519_ok``: its granter has no ML-KEM (the roster says so).

    Raises:
        GrantRejected: addressed to someone else, or in another mode than the prekey's.
        PrekeyUnknown: sealed to a prekey whose private keys are gone.
        WeakKey: the ephemeral key is a low-order point.
        CryptoError: it does not decrypt (opaque).
        WireError: the decrypted payload is malformed.
    """
    if grant.recipient != recipient.pid:
        raise GrantRejected("grant addressed to another participant")
    plaintext = open_with_held_prekey(
        recipient,
        grant.prekey_id,
        Sealed(grant.mode, grant.ephemeral, grant.kem_ciphertext, grant.sealed),
        what="grant",
        label=_LABEL,
        context=_context(grant.cid, grant.granter_key, grant.recipient, grant.prekey_id),
        x25519_ok=x25519_ok,
    )
    return ChainGrant.from_bytes(plaintext)
