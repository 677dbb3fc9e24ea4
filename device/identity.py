"""A participant's long-term identity: Ed25519 + X25519 + ML-KEM-768 (PROTOCOL.md §2).

The secret parts never leave the key store; the public parts travel as a signed
:class:`~schemas.Bundle` whose pid is the hash of the Ed25519 key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from fieldchat.schemas import Bundle
from fieldchat.schemas._codec import fields, pack, unpack
from fieldchat.schemas.crypto import (
    MLKEM768_SEED_BYTES,
    Signer,
    hkdf_sha256,
    mlkem768_public_from_seed,
    x25519_public_from_private,
)
from fieldchat.schemas.errors import KeyStoreError, WireError

__all__ = ["Identity"]

_SEED_INFO = b"fieldchat identity v1"


class Identity:
    """Secret keys of one participant and its signed bundle.

    ``mlkem_seed`` is ``None`` for a participant without ML-KEM (``init --no-pq``, or
    a browser without WebCrypto ML-KEM); such a participant receives X25519-only
    grants, and conversations that require post-quantum members do not admit it.
    """

    __slots__ = ("_signer", "bundle", "mlkem_seed", "pid", "x25519_private")

    def __init__(
        self,
        *,
        ed25519_seed: bytes,
        x25519_private: bytes,
        mlkem_seed: bytes | None,
        created_at: int,
    ) -> None:
        self._signer = Signer(ed25519_seed)
        self.x25519_private = x25519_private
        self.mlkem_seed = mlkem_seed
        self.bundle = Bundle.create(
            ed25519=self._signer.public,
            x25519=x25519_public_from_private(x25519_private),
            mlkem768=mlkem768_public_from_seed(mlkem_seed) if mlkem_seed else None,
            created_at=created_at,
            sign=self._signer.sign,
        )
        self.pid = self.bundle.pid

    @classmethod
    def from_seed(cls, seed: bytes, *, created_at: int = 0, post_quantum: bool = True) -> Identity:
        """Derive every key from one 32-byte seed (test vectors, reproducible demos)."""
        okm = hkdf_sha256(seed, salt=None, info=_SEED_INFO, length=64 + MLKEM768_SEED_BYTES)
        return cls(
            ed25519_seed=okm[:32],
            x25519_private=okm[32:64],
            mlkem_seed=okm[64:] if post_quantum else None,
            created_at=created_at,
        )

    @classmethod
    def generate(
        cls,
        *,
        random: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.time,
        post_quantum: bool = True,
    ) -> Identity:
        """A fresh identity from the operating system's CSPRNG."""
        return cls.from_seed(random(32), created_at=int(clock()), post_quantum=post_quantum)

    @property
    def public(self) -> bytes:
        """The Ed25519 public key."""
        return self._signer.public

    def fingerprint(self) -> str:
        return self.bundle.fingerprint()

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)

    def to_secret_bytes(self) -> bytes:
        """Serialize the secret keys for the key store (never for the wire)."""
        return pack(
            (
                self._signer_seed(),
                self.x25519_private,
                self.mlkem_seed,
                self.bundle.created_at,
            )
        )

    def _signer_seed(self) -> bytes:
        return self._signer.seed

    @classmethod
    def from_secret_bytes(cls, data: bytes) -> Identity:
        """Raises: KeyStoreError: corrupt identity record."""
        try:
            ed, x, kem, created = fields(unpack(data, "identity"), 4, "identity")
            return cls(ed25519_seed=ed, x25519_private=x, mlkem_seed=kem, created_at=created)
        except (WireError, TypeError, ValueError) as exc:
            raise KeyStoreError("the stored identity is corrupt") from exc

    def __repr__(self) -> str:
        return f"Identity(pid={self.pid})"
