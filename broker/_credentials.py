"""Broker credentials: random tokens, stored only as Mosquitto-compatible hashes.

A credential is 32 random bytes in lowercase base32 (52 characters of a-z and 2-7),
printed once at enrollment. Not URL-safe base64: a token starting with ``-`` was read
as an option by command lines (``--credential -x…``), one login in 64.

The store keeps ``$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512, the format of
Mosquitto 2's password file, so ``fieldchat broker mosquitto-config`` can write a
password file without ever keeping a secret. A memory-hard hash (argon2id) protects
low-entropy human passwords; a 256-bit random token cannot be guessed whatever the
hash costs, so a cheap hash is safe here and keeps a burst of reconnecting devices
(or of bad logins) from exhausting a Pi's CPU.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["ITERATIONS", "hash_credential", "new_credential", "verify_credential"]

ITERATIONS = 1_000
_SALT_BYTES = 12
_PREFIX = "$7$"


def new_credential() -> str:
    """A fresh 256-bit credential (52 characters of a-z and 2-7)."""
    return base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()


def hash_credential(credential: str, *, salt: bytes | None = None) -> str:
    """Hash for storage in Mosquitto's ``$7$`` format."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", credential.encode(), salt, ITERATIONS)
    return (
        f"{_PREFIX}{ITERATIONS}${base64.b64encode(salt).decode()}$"
        f"{base64.b64encode(digest).decode()}"
    )


def verify_credential(presented: bytes, stored: str) -> bool:
    """Constant-time check of a presented password against a stored ``$7$`` hash."""
    try:
        _, _, iterations, salt_b64, hash_b64 = stored.split("$")
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
        rounds = int(iterations)
    except ValueError:
        return False
    if not 1 <= rounds <= 1_000_000:
        return False
    actual = hashlib.pbkdf2_hmac("sha512", presented, salt, rounds)
    return hmac.compare_digest(actual, expected)
