"""Idempotency keys for sends: a retried ``send`` with the same key returns the first
result and never queues the text twice (``fieldchat device run``'s ``send`` method,
:meth:`fieldchat.device.client.Device.send`).

The key is remembered in the state file, in the same transaction as the outbox row
it names, so the two are durable together: a crash (SIGKILL, or a power cut with
``power_safe``) either keeps both or neither, and a daemon restarted after it answers
a retry with the first result. Keys are bounded: at most :data:`MAX_KEYS` of them,
each for at most :data:`MAX_AGE_S`; past either the oldest go (a retry that late is
treated as a new send). A key reused for another conversation or text is refused
(:class:`~fieldchat.schemas.errors.IdempotencyConflict`), as HTTP APIs with such keys do:
the caller has a bug, and sending either text silently would hide it.
"""

from __future__ import annotations

import hashlib

from fieldchat.device.transaction import StateTransaction
from fieldchat.schemas.errors import ConfigError, IdempotencyConflict

__all__ = [
    "MAX_AGE_S",
    "MAX_KEYS",
    "MAX_KEY_LENGTH",
    "SCHEMA",
    "Remembered",
    "check_key",
    "lookup",
    "remember",
]

MAX_KEYS = 10_000  # keyed sends remembered; past it the oldest key is forgotten
MAX_AGE_S = 7 * 24 * 3600.0  # a key older than this is forgotten (a week of retries)
MAX_KEY_LENGTH = 200  # characters

SCHEMA = """
CREATE TABLE IF NOT EXISTS sends_once (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, digest TEXT NOT NULL,
    sent_id INTEGER NOT NULL, cid TEXT NOT NULL, epoch INTEGER NOT NULL,
    chain INTEGER NOT NULL, step INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sends_once_created ON sends_once (created_at);
"""

Remembered = tuple[int, str, int, int, int]  # sent id, cid, epoch, chain, step


def check_key(key: str) -> None:
    """Raises:
    ConfigError: an empty key or one longer than :data:`MAX_KEY_LENGTH`."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ConfigError(f"an idempotency key has 1 to {MAX_KEY_LENGTH} characters")


def _digest(cid: str, text: str) -> str:
    return hashlib.sha256(f"{cid}\0{text}".encode()).hexdigest()


def lookup(tx: StateTransaction, key: str, cid: str, text: str, now: float) -> Remembered | None:
    """The first send under ``key`` (within :data:`MAX_AGE_S`), or ``None``.

    Raises:
        IdempotencyConflict: ``key`` names a send of another conversation or text.
    """
    row = tx.execute(
        "SELECT digest, sent_id, cid, epoch, chain, step FROM sends_once "
        "WHERE key = ? AND created_at >= ?",
        (key, now - MAX_AGE_S),
    ).fetchone()
    if row is None:
        return None
    if row[0] != _digest(cid, text):
        raise IdempotencyConflict(
            f"idempotency key {key!r} was used for another message; nothing was queued"
        )
    return int(row[1]), str(row[2]), int(row[3]), int(row[4]), int(row[5])


def remember(
    tx: StateTransaction, key: str, cid: str, text: str, sent: Remembered, now: float
) -> None:
    """Record ``key`` for ``sent`` (in the transaction that queued it) and forget keys
    past the bounds."""
    tx.execute("DELETE FROM sends_once WHERE key = ? OR created_at < ?", (key, now - MAX_AGE_S))
    tx.execute(
        "INSERT INTO sends_once (key, digest, sent_id, cid, epoch, chain, step, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key, _digest(cid, text), *sent, now),
    )
    tx.execute(
        "DELETE FROM sends_once WHERE seq <= (SELECT MAX(seq) FROM sends_once) - ?", (MAX_KEYS,)
    )
