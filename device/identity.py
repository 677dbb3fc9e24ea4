"""A participant's identity: an Ed25519 key and its rotating prekeys (PROTOCOL.md §2).

The Ed25519 key is the identity (the pid is its hash) and signs everything the
participant publishes. Deliveries and grants are sealed to prekeys (X25519 and,
where available, ML-KEM-768), which rotate by time and by use; a superseded prekey's
private keys are kept for a grace period, for what is still in flight, and then
deleted, so a later thief of this state opens nothing recorded before (§2.5, §7).
Prekeys are drawn from fresh randomness, never derived from the identity seed.

The secret parts never leave the key store; the public parts travel as a signed
:class:`~schemas.Bundle`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from fieldchat.schemas import Bundle
from fieldchat.schemas._codec import fields, pack, unpack
from fieldchat.schemas.bundle import Prekey
from fieldchat.schemas.crypto import (
    MLKEM768_SEED_BYTES,
    Signer,
    hkdf_sha256,
    mlkem768_public_from_seed,
    x25519_public_from_private,
)
from fieldchat.schemas.errors import KeyStoreError, WireError

__all__ = [
    "MAX_OLD_PREKEYS",
    "PREKEY_GRACE_S",
    "PREKEY_MAX_OPENS",
    "PREKEY_ROTATE_S",
    "Identity",
    "PrekeySecret",
]

_SEED_INFO = b"fieldchat identity v2"
# A prekey is replaced after a week or after this many deliveries and grants opened
# with it, whichever comes first; the replaced one's private keys live on for the
# grace period (deliveries queued for an offline member) and no more than the
# newest MAX_OLD_PREKEYS replaced ones are kept (PROTOCOL.md §2.5).
PREKEY_ROTATE_S = 7 * 86_400
PREKEY_MAX_OPENS = 64
PREKEY_GRACE_S = 7 * 86_400
MAX_OLD_PREKEYS = 3


@dataclass(slots=True)
class PrekeySecret:
    """One prekey with its private parts; ``superseded_at`` once a newer one exists."""

    public: Prekey
    x25519_private: bytes
    mlkem_seed: bytes | None
    superseded_at: int | None = None
    opens: int = 0

    @classmethod
    def draw(
        cls, prekey_id: int, now: int, post_quantum: bool, random: Callable[[int], bytes]
    ) -> PrekeySecret:
        x_private = random(32)
        seed = random(MLKEM768_SEED_BYTES) if post_quantum else None
        public = Prekey(
            id=prekey_id,
            x25519=x25519_public_from_private(x_private),
            mlkem768=mlkem768_public_from_seed(seed) if seed else None,
            created_at=now,
        )
        return cls(public, x_private, seed)

    def record(self) -> tuple[object, ...]:
        p = self.public
        return (
            p.id,
            self.x25519_private,
            self.mlkem_seed,
            p.created_at,
            self.superseded_at,
            self.opens,
        )

    @classmethod
    def from_record(cls, raw: object) -> PrekeySecret:
        prekey_id, x_private, seed, created, superseded, opens = fields(raw, 6, "prekey")
        public = Prekey(
            id=prekey_id,
            x25519=x25519_public_from_private(x_private),
            mlkem768=mlkem768_public_from_seed(seed) if seed else None,
            created_at=created,
        )
        return cls(public, x_private, seed, superseded, opens)


class Identity:
    """The signing key of one participant, its prekeys and its current signed bundle.

    ``post_quantum``: its prekeys have ML-KEM. Without it (``init --no-pq``, or a
    browser without WebCrypto ML-KEM) it receives X25519-only deliveries and grants,
    and conversations that require post-quantum members do not admit it.
    """

    __slots__ = ("_signer", "bundle", "created_at", "pid", "post_quantum", "prekeys")

    def __init__(
        self,
        *,
        ed25519_seed: bytes,
        prekeys: list[PrekeySecret],
        post_quantum: bool,
        created_at: int,
    ) -> None:
        if not prekeys:
            raise ValueError("an identity has at least one prekey")
        self._signer = Signer(ed25519_seed)
        self.post_quantum = post_quantum
        self.created_at = created_at
        self.prekeys = prekeys  # oldest first; the last one is current
        self.bundle = self._sign_bundle()
        self.pid = self.bundle.pid

    def _sign_bundle(self) -> Bundle:
        # The bundle's time is its prekey's: it grows with each rotation, so whoever
        # keeps the newest bundle by time (the gateway) keeps the newest prekey.
        prekey = self.prekeys[-1].public
        return Bundle.create(
            ed25519=self._signer.public,
            created_at=prekey.created_at,
            prekey=prekey,
            sign=self._signer.sign,
        )

    @classmethod
    def from_seed(
        cls,
        seed: bytes,
        *,
        created_at: int = 0,
        post_quantum: bool = True,
        random: Callable[[int], bytes] = os.urandom,
    ) -> Identity:
        """The identity key from a 32-byte seed (test vectors, reproducible demos); the
        first prekey from ``random`` (a prekey is never derived from the seed)."""
        ed_seed = hkdf_sha256(seed, salt=None, info=_SEED_INFO, length=32)
        first = PrekeySecret.draw(1, created_at, post_quantum, random)
        return cls(
            ed25519_seed=ed_seed, prekeys=[first], post_quantum=post_quantum, created_at=created_at
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
        return cls.from_seed(
            random(32), created_at=int(clock()), post_quantum=post_quantum, random=random
        )

    @property
    def public(self) -> bytes:
        """The Ed25519 public key."""
        return self._signer.public

    @property
    def current(self) -> PrekeySecret:
        return self.prekeys[-1]

    def prekey(self, prekey_id: int) -> PrekeySecret | None:
        """The prekey ``prekey_id`` if its private keys are still held."""
        return next((p for p in self.prekeys if p.public.id == prekey_id), None)

    def rotation_due(self, now: int) -> bool:
        current = self.current
        return (
            now - current.public.created_at >= PREKEY_ROTATE_S or current.opens >= PREKEY_MAX_OPENS
        )

    def rotate(self, now: int, random: Callable[[int], bytes], *, drop_old: bool = False) -> None:
        """Draw the next prekey and sign the bundle with it. ``drop_old`` (an update,
        §6.7): delete every older prekey now instead of after the grace period."""
        current = self.current
        current.superseded_at = now
        made = max(now, current.public.created_at + 1)  # strictly after the one before
        fresh = PrekeySecret.draw(current.public.id + 1, made, self.post_quantum, random)
        self.prekeys = [fresh] if drop_old else [*self.prekeys, fresh]
        self.prune(now)
        self.bundle = self._sign_bundle()

    def prune(self, now: int) -> bool:
        """Delete the private keys of prekeys past their grace; whether any went."""
        old = [
            p
            for p in self.prekeys[:-1]
            if p.superseded_at is not None and now - p.superseded_at < PREKEY_GRACE_S
        ][-MAX_OLD_PREKEYS:]
        kept = [*old, self.current]
        changed = len(kept) != len(self.prekeys)
        self.prekeys = kept
        return changed

    def fingerprint(self) -> str:
        return self.bundle.fingerprint()

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)

    def to_secret_bytes(self) -> bytes:
        """Serialize the secret keys for the key store (never for the wire)."""
        return pack(
            (
                self._signer.seed,
                self.post_quantum,
                self.created_at,
                tuple(p.record() for p in self.prekeys),
            )
        )

    @classmethod
    def from_secret_bytes(cls, data: bytes) -> Identity:
        """Raises: KeyStoreError: corrupt identity record."""
        try:
            ed, pq, created, raw = fields(unpack(data, "identity"), 4, "identity")
            prekeys = [PrekeySecret.from_record(r) for r in raw]
            return cls(ed25519_seed=ed, prekeys=prekeys, post_quantum=pq, created_at=created)
        except (WireError, TypeError, ValueError) as exc:
            raise KeyStoreError("the stored identity is corrupt") from exc

    def __repr__(self) -> str:
        return f"Identity(pid={self.pid})"
