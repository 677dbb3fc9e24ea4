"""Epoch secrets: the key schedule of an epoch and the deliveries that carry its
secret to each member (PROTOCOL.md §5.3, §6.1).

    epoch_secret = 32 random bytes, drawn by the admin who signs roster e
    commit_e     = HKDF-SHA256(epoch_secret, salt = "fieldchat epoch v2",
                               info = "commit" || cid_bytes || uv(e), 32)
    CK_0(i)      = HKDF-SHA256(epoch_secret, salt = "fieldchat epoch v2",
                               info = "chain" || roster_digest_e || uv(i), 32)

``commit_e`` is in roster e (signed by the admin); the chain keys depend on the
roster's digest, which includes the commit. Every member's chain 0 of the epoch starts
at ``CK_0(its index)``, step 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fieldchat.device.identity import Identity
from fieldchat.device.sealing import Context, Sealed, open_with_held_prekey, seal_to_prekey
from fieldchat.schemas import Bundle, GrantMode
from fieldchat.schemas._varint import encode as uv
from fieldchat.schemas.crypto import hkdf_sha256
from fieldchat.schemas.delivery import Delivery
from fieldchat.schemas.ids import decode_id

__all__ = ["chain_key", "epoch_commit", "make_delivery", "open_delivery"]

_EPOCH_SALT = b"fieldchat epoch v2"
_DELIVERY_LABEL = b"fieldchat delivery v2"


def epoch_commit(secret: bytes, cid_bytes: bytes, epoch: int) -> bytes:
    """What roster ``epoch`` states of its secret: only its drawer can match it (§7)."""
    return hkdf_sha256(secret, salt=_EPOCH_SALT, info=b"commit" + cid_bytes + uv(epoch), length=32)


def chain_key(secret: bytes, roster_digest: bytes, index: int) -> bytes:
    """Step-0 key of chain 0 of the member at ``index`` of the roster with that digest."""
    return hkdf_sha256(
        secret, salt=_EPOCH_SALT, info=b"chain" + roster_digest + uv(index), length=32
    )


def _context(cid_bytes: bytes, epoch: int, prekey_id: int, recipient: str) -> Context:
    recipient_bytes = decode_id(recipient, "pid")

    def context(mode: GrantMode) -> bytes:
        return Delivery.context(mode, cid_bytes, epoch, prekey_id) + recipient_bytes

    return context


def make_delivery(
    secret: bytes,
    recipient: Bundle,
    cid: str,
    epoch: int,
    *,
    random: Callable[[int], bytes] = os.urandom,
) -> Delivery:
    """Seal the epoch secret to the recipient's current prekey.

    Raises:
        WeakKey: the recipient's prekey is unusable.
    """
    cid_bytes = decode_id(cid, "cid")
    prekey = recipient.prekey
    sealed = seal_to_prekey(
        prekey,
        secret,
        label=_DELIVERY_LABEL,
        context=_context(cid_bytes, epoch, prekey.id, recipient.pid),
        random=random,
    )
    return Delivery(
        mode=sealed.mode,
        cid_bytes=cid_bytes,
        epoch=epoch,
        prekey_id=prekey.id,
        ephemeral=sealed.ephemeral,
        kem_ciphertext=sealed.kem_ciphertext,
        sealed=sealed.sealed,
    )


def open_delivery(identity: Identity, delivery: Delivery, *, x25519_ok: bool = False) -> bytes:
    """The epoch secret in a delivery to ``identity`` (the commit is checked by the caller).
    ``x25519_ok``: the admin who drew it has no ML-KEM (the roster says so).

    Raises:
        PrekeyUnknown: sealed to a prekey whose private keys are gone (or never ours).
        GrantRejected: the mode does not match the prekey (downgrade).
        WeakKey, CryptoError: it does not open (opaque).
    """
    return open_with_held_prekey(
        identity,
        delivery.prekey_id,
        Sealed(delivery.mode, delivery.ephemeral, delivery.kem_ciphertext, delivery.sealed),
        what="delivery",
        label=_DELIVERY_LABEL,
        context=_context(delivery.cid_bytes, delivery.epoch, delivery.prekey_id, identity.pid),
        x25519_ok=x25519_ok,
    )
