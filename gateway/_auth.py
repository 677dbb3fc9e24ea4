"""Who is calling: a web session (cookie) or a participant signing its request.

Browsers log in and carry the ``fc_session`` cookie; their account owns the
participant ids it proved it holds (a signed claim, :func:`claim_message`). Devices
have no account: they sign each request with their identity key, which the gateway
checks against the bundle it archived (``p/{pid}/bundle``)::

    X-Fieldchat-Pid: <pid>
    X-Fieldchat-Time: <unix seconds>
    X-Fieldchat-Nonce: <16 to 64 characters of [A-Za-z0-9_-], random, e.g. 16 bytes base64url>
    X-Fieldchat-Signature: <base64url Ed25519 signature, padding optional>

    signed bytes = "fieldchat-http-v2\\n" METHOD "\\n" HOST "\\n" PATH ["?" QUERY] "\\n"
                   TIME "\\n" NONCE

PATH and QUERY exactly as sent. HOST is the gateway's ``host[:port]`` as the client
addresses it, lower case, without the scheme's default port: the host of
``public_origin`` when that is set, else the request's ``Host`` header. So a request
signed for one gateway does not verify at another. TIME must be within
``request_clock_skew_s`` of the gateway's clock, and a ``(pid, nonce)`` is accepted
once while its TIME is inside that window (:class:`ReplayGuard`): a recorded request
replayed, to this gateway or to another on the same database, is refused.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import HTTPConnection

from fieldchat.gateway._accounts import SESSION_COOKIE, Accounts
from fieldchat.gateway._errors import TooManyRequests
from fieldchat.gateway._metrics import GatewayMetrics, RejectSource
from fieldchat.gateway._settings import GatewaySettings, canonical_origin
from fieldchat.gateway._store import Account
from fieldchat.schemas import Bundle, is_valid_id
from fieldchat.schemas.crypto import ed25519_verify
from fieldchat.schemas.errors import CryptoError

__all__ = [
    "CLAIM_LABEL",
    "MAX_NONCES_PER_PID",
    "SIGNING_LABEL",
    "Authenticator",
    "Caller",
    "ReplayGuard",
    "claim_message",
    "request_origin",
    "signed_message",
]

SIGNING_LABEL = "fieldchat-http-v2"
CLAIM_LABEL = "fieldchat-claim-v1"
# Signed requests one participant may make per clock window (±300 s by default; its
# nonces are kept until their TIME leaves the window, ≈ 300 s with synchronised clocks):
# ≈ 3 a second sustained. A device catching up pages 500 envelopes a request, so this is
# half a million envelopes in five minutes; beyond it, 429 until the oldest expire.
MAX_NONCES_PER_PID = 1024
# The in-memory fast path holds at most this many nonces (≈ 120 bytes each); beyond it
# the least recently active participants are forgotten here (the database still has them).
MAX_NONCES_IN_MEMORY = 100_000
NONCE_PURGE_EVERY_S = 30.0
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
BundleLookup = Callable[[str], Awaitable[Bundle | None]]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the participant ids it may act and read for."""

    pids: frozenset[str]
    account: Account | None = None
    session_token: str | None = None


def signed_message(
    method: str, path: str, query: str, timestamp: str, *, host: str, nonce: str
) -> bytes:
    """The bytes a device signs for one request (see the module docstring)."""
    target = f"{path}?{query}" if query else path
    return f"{SIGNING_LABEL}\n{method.upper()}\n{host}\n{target}\n{timestamp}\n{nonce}".encode()


def claim_message(origin: str, account_id: int, pid: str, challenge: str) -> bytes:
    """The bytes a participant signs to prove to this gateway (``origin``) that it lets
    account ``account_id`` act as ``pid``, answering ``challenge``."""
    return f"{CLAIM_LABEL}\n{origin}\n{account_id}\n{pid}\n{challenge}".encode()


def request_origin(conn: HTTPConnection, public_origin: str | None) -> str:
    """The gateway's origin for this request: ``public_origin`` when set, else the
    scheme the request came with (``X-Forwarded-Proto`` only from a trusted proxy) and
    its ``Host`` header, in canonical form.

    Raises:
        ValueError: the Host header is not a host[:port].
    """
    if public_origin is not None:
        return public_origin
    scheme = "https" if conn.url.scheme in ("https", "wss") else "http"
    return canonical_origin(scheme, conn.headers.get("host", ""))


class NonceStore(Protocol):
    async def remember_nonce(self, pid: str, nonce: str, expires_at: float, now: float) -> bool: ...

    async def purge_nonces(self, now: float) -> int: ...


class ReplayGuard:
    """Accepts each ``(pid, nonce)`` once while its request time is inside the window.

    Two layers: a bounded map in memory (a replay to this gateway is refused without a
    database round trip, and a participant past ``per_pid`` nonces is refused with 429),
    and the database (:meth:`NonceStore.remember_nonce`, a unique key), which every
    gateway on it shares. Expired rows are purged every ``NONCE_PURGE_EVERY_S``.
    """

    def __init__(
        self,
        store: NonceStore,
        *,
        per_pid: int = MAX_NONCES_PER_PID,
        max_in_memory: int = MAX_NONCES_IN_MEMORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.per_pid = per_pid
        self.max_in_memory = max_in_memory
        self.clock = clock
        self._seen: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._size = 0
        self._next_purge = 0.0

    def _prune(self, pid: str, seen: dict[str, float], now: float) -> None:
        expired = [n for n, until in seen.items() if until <= now]
        for n in expired:
            del seen[n]
        self._size -= len(expired)
        if not seen:
            del self._seen[pid]

    async def check(self, pid: str, nonce: str, expires_at: float) -> bool:
        """True when this is the first use of ``nonce`` by ``pid`` (it is recorded).

        Raises:
            TooManyRequests: ``pid`` has ``per_pid`` unexpired nonces already.
            StorageError: the database failed.
        """
        now = self.clock()
        seen = self._seen.get(pid)
        if seen is not None:
            if seen.get(nonce, 0.0) > now:
                return False
            if len(seen) >= self.per_pid:
                self._prune(pid, seen, now)
                if len(seen) >= self.per_pid:
                    wait = min(seen.values()) - now
                    raise TooManyRequests("too many signed requests; wait", retry_after=wait)
        seen = self._seen.setdefault(pid, {})
        self._seen.move_to_end(pid)
        if nonce not in seen:
            self._size += 1
        seen[nonce] = expires_at  # before the await: a concurrent duplicate sees it
        while self._size > self.max_in_memory and len(self._seen) > 1:
            _, dropped = self._seen.popitem(last=False)
            self._size -= len(dropped)
        if now >= self._next_purge:
            self._next_purge = now + NONCE_PURGE_EVERY_S
            await self.store.purge_nonces(now)
        return await self.store.remember_nonce(pid, nonce, expires_at, now)


class Authenticator:
    """Resolves the caller of a request or WebSocket: its session cookie, or its
    participant signature (module docstring). Refusals of signed requests are counted
    (``fieldchat_gateway_rejected_total{source="http"}``) by reason."""

    def __init__(
        self,
        settings: GatewaySettings,
        accounts: Accounts,
        bundle_of: BundleLookup,
        guard: ReplayGuard,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.bundle_of = bundle_of
        self.guard = guard
        self.metrics = metrics
        self.clock = clock

    def _refuse(self, reason: str) -> None:
        self.metrics.reject(RejectSource.HTTP, reason)

    async def __call__(self, conn: HTTPConnection, *, fresh: bool = False) -> Caller | None:
        """The caller of ``conn``, or ``None`` when it proves nothing; ``fresh``: read
        the session from the database, not the short cache.

        Raises:
            TooManyRequests: the participant is past its signed-request budget.
            StorageError: the database failed.
        """
        token = conn.cookies.get(SESSION_COOKIE)
        if token:
            account = await self.accounts.session(token, fresh=fresh)
            if account is not None:
                return Caller(frozenset(account.pids), account, token)
        if "x-fieldchat-pid" not in conn.headers:
            return None
        return await self._signed(conn)

    async def _signed(self, conn: HTTPConnection) -> Caller | None:  # noqa: PLR0911 - one per proof
        pid = conn.headers.get("x-fieldchat-pid", "")
        stamp = conn.headers.get("x-fieldchat-time", "")
        nonce = conn.headers.get("x-fieldchat-nonce", "")
        sig_text = conn.headers.get("x-fieldchat-signature", "")
        if not is_valid_id(pid) or not stamp.isdigit() or len(stamp) > 12:
            self._refuse("malformed")
            return None
        if not _NONCE.fullmatch(nonce):
            self._refuse("nonce")
            return None
        skew = self.settings.request_clock_skew_s
        if abs(self.clock() - int(stamp)) > skew:
            self._refuse("stale")
            return None
        try:
            signature = base64.urlsafe_b64decode(sig_text + "=" * (-len(sig_text) % 4))
            host = request_origin(conn, self.settings.public_origin).split("://", 1)[1]
        except (binascii.Error, ValueError):
            self._refuse("malformed")
            return None
        bundle = await self.bundle_of(pid)
        if bundle is None:
            self._refuse("unknown_participant")
            return None
        method = conn.scope.get("method", "GET")
        query = conn.scope.get("query_string", b"").decode("latin-1")
        message = signed_message(method, conn.url.path, query, stamp, host=host, nonce=nonce)
        try:
            ed25519_verify(bundle.ed25519, signature, message)
        except CryptoError:
            self._refuse("auth")
            return None
        if not await self.guard.check(pid, nonce, int(stamp) + skew):
            self._refuse("replay")
            return None
        return Caller(frozenset({pid}))
