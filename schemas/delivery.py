"""Epoch secret deliveries: the admin who signs a roster seals the epoch's secret to
each other member's prekey (PROTOCOL.md §5.3).

    0x01 | 0x13 | msgpack[mode, cid_bytes, epoch, prekey_id, ephemeral_x25519,
                          kem_ciphertext | nil, sealed]

No signature: the roster of the epoch commits to the secret (``Roster.commit``), and
the admin's signature on the roster covers that commit, so only the admin that drew
the secret can deliver one that a member accepts. The recipient is not on the wire
(its inbox topic says whose it is); it is in the transcript the key is bound to.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from fieldchat.schemas import _codec
from fieldchat.schemas._codec import build, fields
from fieldchat.schemas._model import WireModel
from fieldchat.schemas.crypto import MLKEM768_CIPHERTEXT_BYTES
from fieldchat.schemas.envelope import VERSION
from fieldchat.schemas.errors import UnsupportedVersion, WireError
from fieldchat.schemas.grant import GrantMode
from fieldchat.schemas.ids import ID_BYTES, encode_id
from fieldchat.schemas.kinds import ObjectKind

__all__ = ["EPOCH_SECRET_BYTES", "Delivery", "is_delivery"]

EPOCH_SECRET_BYTES = 32
_SEALED_BYTES = EPOCH_SECRET_BYTES + 16
_FIELDS = 7


class Delivery(WireModel):
    mode: GrantMode
    cid_bytes: Annotated[bytes, Field(min_length=ID_BYTES, max_length=ID_BYTES)]
    epoch: Annotated[int, Field(ge=0, lt=2**28)]
    prekey_id: Annotated[int, Field(ge=1, lt=2**28)]
    ephemeral: Annotated[bytes, Field(min_length=32, max_length=32)]
    kem_ciphertext: bytes | None
    sealed: Annotated[bytes, Field(min_length=_SEALED_BYTES, max_length=_SEALED_BYTES)]

    @model_validator(mode="after")
    def _check_mode(self) -> Delivery:
        if self.mode is GrantMode.HYBRID:
            if self.kem_ciphertext is None or len(self.kem_ciphertext) != MLKEM768_CIPHERTEXT_BYTES:
                raise ValueError("a hybrid delivery carries a 1088-byte ML-KEM ciphertext")
        elif self.kem_ciphertext is not None:
            raise ValueError("an X25519 delivery carries no ML-KEM ciphertext")
        return self

    @property
    def cid(self) -> str:
        return encode_id(self.cid_bytes)

    @staticmethod
    def context(mode: GrantMode, cid_bytes: bytes, epoch: int, prekey_id: int) -> bytes:
        """What the hybrid KEM binds the secret to (PROTOCOL.md §5.3), before the
        recipient's pid; the combiner adds the keys and the ciphertexts."""
        return _codec.pack((int(mode), cid_bytes, epoch, prekey_id))

    def to_bytes(self) -> bytes:
        return bytes((VERSION, ObjectKind.DELIVERY)) + _codec.pack(
            (
                int(self.mode),
                self.cid_bytes,
                self.epoch,
                self.prekey_id,
                self.ephemeral,
                self.kem_ciphertext,
                self.sealed,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Delivery:
        """Decode (nothing is verified: the recipient opens it and checks the commit).

        Raises:
            UnsupportedVersion, WireError: malformed.
        """
        data = bytes(data)
        if not data:
            raise WireError("empty delivery")
        if data[0] != VERSION:
            raise UnsupportedVersion(f"unsupported delivery version 0x{data[0]:02x}")
        if len(data) < 3 or data[1] != ObjectKind.DELIVERY:
            raise WireError("not a delivery")
        mode, cid_bytes, epoch, prekey_id, ephemeral, kem_ct, sealed = fields(
            _codec.unpack(data[2:], "delivery"), _FIELDS, "delivery"
        )
        if mode not in (1, 2) or isinstance(mode, bool):
            raise WireError(f"unknown delivery mode {mode!r}"[:60])
        return build(
            cls,
            "delivery",
            mode=GrantMode(mode),
            cid_bytes=cid_bytes,
            epoch=epoch,
            prekey_id=prekey_id,
            ephemeral=ephemeral,
            kem_ciphertext=kem_ct,
            sealed=sealed,
        )


def is_delivery(data: bytes) -> bool:
    """Whether ``data`` is framed as a delivery (version byte, kind 0x13)."""
    return len(data) >= 2 and data[0] == VERSION and data[1] == ObjectKind.DELIVERY
