"""Keeping the broker routing envelopes to the archiver: how soon to reconnect, and the
canary that shows the shared subscription still delivers.

Mosquitto (2.0.11) restores a persistent session after a restart, even a clean one,
without its ``$share/…`` subscriptions: until the archiver subscribes again, envelopes
go to the members and to no gateway. A soak lost 30 of 1,620 and 248 of 5,400 that way
while the archiver's backoff had grown to 6.4 s (issue 14). So the archiver subscribes
again after every connection, whatever ``session present`` says; reconnects within
:data:`RECONNECT_MAX_S` of the broker coming back (:class:`Backoff`); and sends
canaries through the shared subscription (:class:`Canary`), at start and then every
``canary_interval_s``, to find a subscription the broker dropped without a reconnect.

A canary is a 32-byte message on ``c/{CANARY_CID}/msg``: a random nonce and its
HMAC-SHA256 (truncated to 16 bytes) under a key every gateway on the database shares
(``gateway_secrets``). The gateways of a share group split what arrives there, so the
replica that receives a canary may not be the one that sent it: the receiver notes the
nonce in the shared database (table ``canaries``), the sender looks for it there (or is
told at once when it received its own). The topic is an ordinary conversation topic,
which the ACLs already let gateways publish and subscribe to on every broker (the
embedded one, the generated Mosquitto ACL, NATS), so no ACL changes; no participant
is a member of ``CANARY_CID`` (it is no ``cid_for`` of anyone: that would need a
preimage of SHA-256), and the archiver never archives nor shows a canary. The MAC keeps
a participant who may publish there anyway (NATS cannot check membership) from making
the gateways write rows: a payload that does not verify is refused and counted
(``canary``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from collections.abc import Callable

from fieldchat.schemas.ids import encode_id

__all__ = [
    "CANARY_CID",
    "CANARY_SECRET",
    "RECONNECT_FIRST_S",
    "RECONNECT_MAX_S",
    "RECONNECT_MIN_S",
    "RECONNECT_REFUSED_S",
    "Backoff",
    "Canary",
]

CANARY_CID = encode_id(hashlib.sha256(b"fieldchat routing canary v1").digest()[:16])
CANARY_SECRET = "routing_canary"  # noqa: S105 - the name of its key in gateway_secrets
_LABEL = b"fieldchat-canary-v1\n"
_NONCE_BYTES = 16
_MAC_BYTES = 16

# Reconnect delays. A gateway replica is one client, not thousands of devices: trying
# twice a second while the broker is down costs the broker a refused TCP connection each
# time, and brings the archiver back (and subscribed) within 0.5 s of the broker, sooner
# than a device at its default backoff (0.5 s, doubling) usually is. The first retry
# after a lost connection goes at once (jittered: replicas do not all arrive together).
RECONNECT_FIRST_S = 0.05
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 0.5
# The broker refused our credentials: no retry rate will fix that, an operator will.
RECONNECT_REFUSED_S = 10.0


class Backoff:
    """Reconnect delays: the first attempt within ``first_s`` (uniform jitter), then
    ``min_s`` doubling up to ``max_s``, each with equal jitter (half fixed, half
    random), so no wait is ever longer than ``max_s``.

    Args:
        rand: uniform in [0, 1) (tests inject one).
    """

    def __init__(
        self,
        *,
        first_s: float = RECONNECT_FIRST_S,
        min_s: float = RECONNECT_MIN_S,
        max_s: float = RECONNECT_MAX_S,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.first_s, self.min_s, self.max_s = first_s, min_s, max_s
        self.rand = rand
        self.attempts = 0

    def next(self) -> float:
        """Seconds to wait before the next attempt."""
        if self.attempts == 0:
            delay = self.first_s * self.rand()
        else:
            base = min(self.max_s, self.min_s * 2 ** min(self.attempts - 1, 32))
            delay = base / 2 + base / 2 * self.rand()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Connected: the next loss starts again from the first, immediate, attempt."""
        self.attempts = 0


class Canary:
    """Makes canary payloads and recognises them, under the shared key."""

    def __init__(self, key: bytes, *, token: Callable[[int], bytes] = os.urandom) -> None:
        self._key = key
        self._token = token

    def _mac(self, nonce: bytes) -> bytes:
        return hmac.new(self._key, _LABEL + nonce, hashlib.sha256).digest()[:_MAC_BYTES]

    def make(self) -> tuple[bytes, bytes]:
        """A fresh ``(nonce, payload)``."""
        nonce = self._token(_NONCE_BYTES)
        return nonce, nonce + self._mac(nonce)

    def nonce_of(self, payload: bytes) -> bytes | None:
        """The nonce of a genuine canary payload, or None (not made with our key)."""
        if len(payload) != _NONCE_BYTES + _MAC_BYTES:
            return None
        nonce, mac = payload[:_NONCE_BYTES], payload[_NONCE_BYTES:]
        return nonce if hmac.compare_digest(mac, self._mac(nonce)) else None
