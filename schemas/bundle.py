"""A participant's signed public key bundle, retained on ``p/{pid}/bundle`` (PROTOCOL.md §2.2)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from fieldchat.schemas import _signed
from fieldchat.schemas._codec import build
from fieldchat.schemas._model import WireModel
from fieldchat.schemas.crypto import ed25519_verify
from fieldchat.schemas.ids import pid_for
from fieldchat.schemas.kinds import ObjectKind

__all__ = ["Bundle"]

Key32 = Annotated[bytes, Field(min_length=32, max_length=32)]
Sig = Annotated[bytes, Field(min_length=64, max_length=64)]
MlKemKey = Annotated[bytes, Field(min_length=1184, max_length=1184)]
_FIELDS = 4


class Bundle(WireModel):
    """Public keys of one participant, signed by its Ed25519 identity key.

    ``mlkem768`` is ``None`` for participants without ML-KEM (browsers): grants to
    them are X25519-only and rosters mark them as not post-quantum protected.
    """

    ed25519: Key32
    x25519: Key32
    mlkem768: MlKemKey | None
    created_at: Annotated[int, Field(ge=0, lt=2**40)]
    signature: Sig

    @property
    def pid(self) -> str:
        return pid_for(self.ed25519)

    @property
    def post_quantum(self) -> bool:
        return self.mlkem768 is not None

    @staticmethod
    def body(ed25519: bytes, x25519: bytes, mlkem768: bytes | None, created_at: int) -> bytes:
        return _signed.to_be_signed(ObjectKind.BUNDLE, (ed25519, x25519, mlkem768, created_at))

    @classmethod
    def create(
        cls,
        *,
        ed25519: bytes,
        x25519: bytes,
        mlkem768: bytes | None,
        created_at: int,
        sign: Callable[[bytes], bytes],
    ) -> Bundle:
        """Build and sign a bundle with the identity's signing function."""
        signature = sign(cls.body(ed25519, x25519, mlkem768, created_at))
        return cls(
            ed25519=ed25519,
            x25519=x25519,
            mlkem768=mlkem768,
            created_at=created_at,
            signature=signature,
        )

    def signed_bytes(self) -> bytes:
        return self.body(self.ed25519, self.x25519, self.mlkem768, self.created_at)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> Bundle:
        """Decode and verify the self-signature.

        Raises:
            UnsupportedVersion, WireError: malformed.
            CryptoError: the signature does not verify.
        """
        (ed, x, kem, created), signed, signature = _signed.split(data, ObjectKind.BUNDLE, _FIELDS)
        bundle = build(
            cls,
            "bundle",
            ed25519=ed,
            x25519=x,
            mlkem768=kem,
            created_at=created,
            signature=signature,
        )
        ed25519_verify(bundle.ed25519, signature, signed)
        return bundle

    def fingerprint(self) -> str:
        """Human-comparable fingerprint over all public keys: 12 groups of 5 digits.

        Each group is 40 bits of SHA-512 reduced mod 10^5 (as Signal's safety
        numbers), about 199 bits in all; people compare them aloud, out of band.
        """
        digest = hashlib.sha512(
            b"fieldchat fingerprint v1" + self.ed25519 + self.x25519 + (self.mlkem768 or b"")
        ).digest()
        return " ".join(
            f"{int.from_bytes(digest[i * 5 : i * 5 + 5], 'big') % 100_000:05d}" for i in range(12)
        )
