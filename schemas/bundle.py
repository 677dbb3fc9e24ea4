"""A participant's signed public key bundle, retained on ``p/{pid}/bundle`` (PROTOCOL.md §2.2).

    0x01 | 0x11 | msgpack[ed25519_pub, created_at, prekey] | sig
    prekey = msgpack[prekey_id, x25519_pub, mlkem768_pub | nil, created_at]

The Ed25519 key is the identity (the pid is its hash); the prekey is what key
deliveries and grants are sealed to (PROTOCOL.md §2.4-§2.5). Prekeys rotate: a newer
bundle with another prekey is the same identity, never a key change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from fieldchat.schemas import _codec, _signed
from fieldchat.schemas._codec import build, fields
from fieldchat.schemas._model import WireModel
from fieldchat.schemas.crypto import ed25519_verify, sha256
from fieldchat.schemas.errors import WireError
from fieldchat.schemas.ids import pid_for
from fieldchat.schemas.kinds import ObjectKind

__all__ = ["Bundle", "Prekey"]

Key32 = Annotated[bytes, Field(min_length=32, max_length=32)]
Sig = Annotated[bytes, Field(min_length=64, max_length=64)]
MlKemKey = Annotated[bytes, Field(min_length=1184, max_length=1184)]
_FIELDS = 3


class Prekey(WireModel):
    """The public half of a rotating prekey (PROTOCOL.md §2.4).

    ``mlkem768`` is ``None`` for a participant without ML-KEM (a browser without
    WebCrypto ML-KEM): what is sealed to it is X25519-only and rosters mark it as not
    post-quantum protected.
    """

    id: Annotated[int, Field(ge=1, lt=2**28)]
    x25519: Key32
    mlkem768: MlKemKey | None
    created_at: Annotated[int, Field(ge=0, lt=2**40)]

    def fields(self) -> tuple[int, bytes, bytes | None, int]:
        return (self.id, self.x25519, self.mlkem768, self.created_at)

    def digest(self) -> bytes:
        """SHA-256 of the encoded prekey: an UPDATE names the prekey by it (§6.7)."""
        return sha256(_codec.pack(self.fields()))


class Bundle(WireModel):
    """The identity key of one participant and its current prekey, signed by it."""

    ed25519: Key32
    created_at: Annotated[int, Field(ge=0, lt=2**40)]
    prekey: Prekey
    signature: Sig

    @property
    def pid(self) -> str:
        return pid_for(self.ed25519)

    @property
    def post_quantum(self) -> bool:
        return self.prekey.mlkem768 is not None

    @staticmethod
    def body(ed25519: bytes, created_at: int, prekey: Prekey) -> bytes:
        return _signed.to_be_signed(ObjectKind.BUNDLE, (ed25519, created_at, prekey.fields()))

    @classmethod
    def create(
        cls,
        *,
        ed25519: bytes,
        created_at: int,
        prekey: Prekey,
        sign: Callable[[bytes], bytes],
    ) -> Bundle:
        """Build and sign a bundle with the identity's signing function."""
        signature = sign(cls.body(ed25519, created_at, prekey))
        return cls(ed25519=ed25519, created_at=created_at, prekey=prekey, signature=signature)

    def signed_bytes(self) -> bytes:
        return self.body(self.ed25519, self.created_at, self.prekey)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> Bundle:
        """Decode and verify the self-signature.

        Raises:
            UnsupportedVersion, WireError: malformed.
            CryptoError: the signature does not verify.
        """
        (ed, created, raw_prekey), signed, signature = _signed.split(
            data, ObjectKind.BUNDLE, _FIELDS
        )
        if not isinstance(raw_prekey, tuple):
            raise WireError("bundle prekey must be an array")
        pid_, x, kem, pk_created = fields(raw_prekey, 4, "prekey")
        prekey = build(Prekey, "prekey", id=pid_, x25519=x, mlkem768=kem, created_at=pk_created)
        bundle = build(
            cls, "bundle", ed25519=ed, created_at=created, prekey=prekey, signature=signature
        )
        ed25519_verify(bundle.ed25519, signature, signed)
        return bundle

    def fingerprint(self) -> str:
        """Human-comparable fingerprint of the identity key: 12 groups of 5 digits.

        Each group is 40 bits of SHA-512 reduced mod 10^5 (as Signal's safety
        numbers), about 199 bits in all; people compare them aloud, out of band.
        Prekeys are signed by this key, so the fingerprint covers them.
        """
        digest = hashlib.sha512(b"fieldchat fingerprint v2" + self.ed25519).digest()
        return " ".join(
            f"{int.from_bytes(digest[i * 5 : i * 5 + 5], 'big') % 100_000:05d}" for i in range(12)
        )
