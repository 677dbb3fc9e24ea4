"""Key grants: a member's own re-keyed chain (chain >= 1) delivered to one member's
inbox, sealed to its prekey (PROTOCOL.md §5.4).

    version | 0x10 | msgpack[mode, cid, granter_key, recipient, prekey_id, ephemeral,
                             kem_ct, sealed] | sig

``mode`` says how the AES-GCM key was agreed: ``HYBRID`` (X25519 + ML-KEM-768) or
``X25519`` (the recipient has no ML-KEM key; rosters mark such members). The
signature by the granter's identity key covers every other byte.

The sealed :class:`ChainGrant` also states where the granter's sending chains of
earlier epochs ended (``ends``): once a roster removes a member, receivers accept an
unsigned envelope of an earlier epoch only below that end (PROTOCOL.md §6.4, §7).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Annotated

from pydantic import Field, model_validator

from fieldchat.schemas import _codec, _signed
from fieldchat.schemas._codec import build
from fieldchat.schemas._model import WireModel
from fieldchat.schemas.crypto import MLKEM768_CIPHERTEXT_BYTES, ed25519_verify
from fieldchat.schemas.errors import LimitExceeded, WireError
from fieldchat.schemas.ids import pid_for
from fieldchat.schemas.kinds import ObjectKind
from fieldchat.schemas.roster import Pid

__all__ = ["MAX_CHAIN_ENDS", "ChainEnd", "ChainGrant", "Grant", "GrantMode"]

_FIELDS = 8
MAX_GRANT_SEALED = 1024
# Chain ends a grant may state: one per earlier epoch a receiver still opens
# (device.engine.KEEP_EPOCHS - 1 = 3), with room for one more.
MAX_CHAIN_ENDS = 4


class GrantMode(enum.IntEnum):
    HYBRID = 1
    X25519 = 2


class Grant(WireModel):
    mode: GrantMode
    cid: Pid
    granter_key: Annotated[bytes, Field(min_length=32, max_length=32)]
    recipient: Pid
    prekey_id: Annotated[int, Field(ge=1, lt=2**28)]
    ephemeral: Annotated[bytes, Field(min_length=32, max_length=32)]
    kem_ciphertext: bytes | None
    sealed: Annotated[bytes, Field(min_length=16, max_length=MAX_GRANT_SEALED)]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    @model_validator(mode="after")
    def _check_mode(self) -> Grant:
        if self.mode is GrantMode.HYBRID:
            if self.kem_ciphertext is None or len(self.kem_ciphertext) != MLKEM768_CIPHERTEXT_BYTES:
                raise ValueError("a hybrid grant carries a 1088-byte ML-KEM ciphertext")
        elif self.kem_ciphertext is not None:
            raise ValueError("an X25519 grant carries no ML-KEM ciphertext")
        return self

    @property
    def granter(self) -> str:
        return pid_for(self.granter_key)

    @staticmethod
    def context(
        mode: GrantMode, cid: str, granter_key: bytes, recipient: str, prekey_id: int
    ) -> bytes:
        """What the hybrid KEM binds a grant's key to (PROTOCOL.md §5.4): its mode, the
        conversation, the granter, the recipient and its prekey; the combiner adds the
        keys and the ciphertexts."""
        return _codec.pack((int(mode), cid, granter_key, recipient, prekey_id))

    @classmethod
    def create(
        cls,
        *,
        mode: GrantMode,
        cid: str,
        granter_key: bytes,
        recipient: str,
        prekey_id: int,
        ephemeral: bytes,
        kem_ciphertext: bytes | None,
        sealed: bytes,
        sign: Callable[[bytes], bytes],
    ) -> Grant:
        body = _signed.to_be_signed(
            ObjectKind.GRANT,
            (int(mode), cid, granter_key, recipient, prekey_id, ephemeral, kem_ciphertext, sealed),
        )
        return cls(
            mode=mode,
            cid=cid,
            granter_key=granter_key,
            recipient=recipient,
            prekey_id=prekey_id,
            ephemeral=ephemeral,
            kem_ciphertext=kem_ciphertext,
            sealed=sealed,
            signature=sign(body),
        )

    def signed_bytes(self) -> bytes:
        return _signed.to_be_signed(
            ObjectKind.GRANT,
            (
                int(self.mode),
                self.cid,
                self.granter_key,
                self.recipient,
                self.prekey_id,
                self.ephemeral,
                self.kem_ciphertext,
                self.sealed,
            ),
        )

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> Grant:
        """Decode and verify the granter's signature.

        Raises:
            UnsupportedVersion, WireError: malformed.
            CryptoError: the signature does not verify.
        """
        body, signed, signature = _signed.split(data, ObjectKind.GRANT, _FIELDS)
        mode, cid, granter_key, recipient, prekey_id, ephemeral, kem_ct, sealed = body
        if mode not in (1, 2) or isinstance(mode, bool):
            raise WireError(f"unknown grant mode {mode!r}"[:60])
        grant = build(
            cls,
            "grant",
            mode=GrantMode(mode),
            cid=cid,
            granter_key=granter_key,
            recipient=recipient,
            prekey_id=prekey_id,
            ephemeral=ephemeral,
            kem_ciphertext=kem_ct,
            sealed=sealed,
            signature=signature,
        )
        ed25519_verify(grant.granter_key, signature, signed)
        return grant


class ChainEnd(WireModel):
    """Where one of the granter's earlier sending chains ended: ``next_step`` is the
    first step it never sealed in ``(epoch, chain)`` (0 if it sealed none)."""

    epoch: Annotated[int, Field(ge=0, lt=2**28)]
    chain: Annotated[int, Field(ge=0, lt=2**28)]
    next_step: Annotated[int, Field(ge=0, lt=2**28)]


class ChainGrant(WireModel):
    """The plaintext of a grant: the granter's sending chain for one epoch, from ``step``.

    ``roster`` is the digest of that epoch's roster, binding the key to one membership.
    ``ends``: where the granter's chains of earlier epochs ended (at most
    MAX_CHAIN_ENDS, each of an epoch before ``epoch``, no chain twice).
    """

    epoch: Annotated[int, Field(ge=0, lt=2**28)]
    roster: Annotated[bytes, Field(min_length=32, max_length=32)]
    sender: Annotated[int, Field(ge=0, lt=2**28)]
    chain: Annotated[int, Field(ge=0, lt=2**28)]
    step: Annotated[int, Field(ge=0, lt=2**28)]
    key: Annotated[bytes, Field(min_length=32, max_length=32)]
    ends: Annotated[tuple[ChainEnd, ...], Field(max_length=MAX_CHAIN_ENDS)] = ()

    @model_validator(mode="after")
    def _check_ends(self) -> ChainGrant:
        if any(end.epoch >= self.epoch for end in self.ends):
            raise ValueError("a chain end names an epoch before the grant's")
        if len({(end.epoch, end.chain) for end in self.ends}) != len(self.ends):
            raise ValueError("a chain end is stated twice")
        return self

    def to_bytes(self) -> bytes:
        ends = tuple((end.epoch, end.chain, end.next_step) for end in self.ends)
        return _codec.pack(
            (self.epoch, self.roster, self.sender, self.chain, self.step, self.key, ends)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ChainGrant:
        """Raises: WireError: malformed; LimitExceeded: more than MAX_CHAIN_ENDS ends."""
        epoch, roster, sender, chain, step, key, raw_ends = _codec.fields(
            _codec.unpack(data, "chain grant"), 7, "chain grant"
        )
        if not isinstance(raw_ends, tuple):
            raise WireError("chain grant ends must be an array")
        if len(raw_ends) > MAX_CHAIN_ENDS:
            raise LimitExceeded(f"a chain grant states at most {MAX_CHAIN_ENDS} chain ends")
        ends = []
        for raw in raw_ends:
            end_epoch, end_chain, next_step = _codec.fields(raw, 3, "chain end")
            ends.append(
                build(ChainEnd, "chain end", epoch=end_epoch, chain=end_chain, next_step=next_step)
            )
        return build(
            cls,
            "chain grant",
            epoch=epoch,
            roster=roster,
            sender=sender,
            chain=chain,
            step=step,
            key=key,
            ends=tuple(ends),
        )
