"""Deliveries and grants sealed to a recipient's prekey (PROTOCOL.md §5.3-§5.4): the
one hybrid KEM of :func:`~fieldchat.schemas.crypto.hybrid_seal` (X25519 + ML-KEM-768,
the browser's too), with the prekey as the recipient's keys and the object's context.

    context = label || msgpack[...the object's public part...]

The context names who seals what to whom (mode, conversation, epoch or granter,
prekey id, recipient); the combiner itself binds the ephemeral key, the ML-KEM
ciphertext and the prekey's public keys. Hybrid when the prekey has ML-KEM, X25519
only when it has none (a browser without WebCrypto ML-KEM, which the roster shows).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fieldchat.schemas import GrantMode
from fieldchat.schemas.bundle import Prekey
from fieldchat.schemas.crypto import HybridSealed, hybrid_open, hybrid_seal
from fieldchat.schemas.errors import GrantRejected, PrekeyUnknown

if TYPE_CHECKING:
    from fieldchat.device.identity import Identity

__all__ = ["Context", "Sealed", "open_from_prekey", "seal_to_prekey"]

Context = Callable[[GrantMode], bytes]
"""``mode -> bytes``: the object's public part, which the sealed key is bound to."""


@dataclass(frozen=True, slots=True)
class Sealed:
    mode: GrantMode
    ephemeral: bytes
    kem_ciphertext: bytes | None
    sealed: bytes


def seal_to_prekey(
    prekey: Prekey,
    plaintext: bytes,
    *,
    label: bytes,
    context: Context,
    random: Callable[[int], bytes] = os.urandom,
) -> Sealed:
    """Seal ``plaintext`` to ``prekey``: hybrid when it has ML-KEM, else X25519 only.

    Raises:
        WeakKey: the prekey is unusable (low-order point, bad ML-KEM key).
    """
    mode = GrantMode.HYBRID if prekey.mlkem768 is not None else GrantMode.X25519
    out = hybrid_seal(
        x25519_public=prekey.x25519,
        mlkem768_public=prekey.mlkem768,
        context=label + context(mode),
        plaintext=plaintext,
        random=random,
    )
    return Sealed(mode, out.ephemeral, out.kem_ciphertext, out.sealed)


def open_from_prekey(
    prekey: Prekey,
    x25519_private: bytes,
    mlkem_seed: bytes | None,
    sealed: Sealed,
    *,
    label: bytes,
    context: Context,
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
    if hybrid and (mlkem_seed is None or prekey.mlkem768 is None):
        raise GrantRejected("a hybrid seal to a prekey without ML-KEM")
    if not hybrid and mlkem_seed is not None and not x25519_ok:
        raise GrantRejected("X25519-only seal to a post-quantum prekey (downgrade)")
    return hybrid_open(
        x25519_private=x25519_private,
        mlkem768_seed=mlkem_seed if hybrid else None,
        x25519_public=prekey.x25519,
        mlkem768_public=prekey.mlkem768 if hybrid else None,
        message=HybridSealed(sealed.ephemeral, sealed.kem_ciphertext, sealed.sealed),
        context=label + context(sealed.mode),
    )


def open_with_held_prekey(
    identity: Identity,
    prekey_id: int,
    sealed: Sealed,
    *,
    what: str,
    label: bytes,
    context: Context,
    x25519_ok: bool = False,
) -> bytes:
    """:func:`open_from_prekey` with the prekey ``prekey_id`` that ``identity`` still
    holds, counting the open towards its rotation (PROTOCOL.md §2.5).

    Raises:
        PrekeyUnknown: that prekey's private keys are not held (never, or deleted).
        GrantRejected, WeakKey, CryptoError: as :func:`open_from_prekey`.
    """
    held = identity.prekey(prekey_id)
    if held is None:
        raise PrekeyUnknown(f"{what} sealed to prekey {prekey_id}, not held")
    opened = open_from_prekey(
        held.public,
        held.x25519_private,
        held.mlkem_seed,
        sealed,
        label=label,
        context=context,
        x25519_ok=x25519_ok,
    )
    held.opens += 1
    return opened
