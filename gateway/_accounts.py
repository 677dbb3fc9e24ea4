"""Web accounts: argon2id password hashes, login rate limiting, server-side sessions.

Hashing and verifying run in a worker thread (argon2 is deliberately slow and
memory-hard); the rate limiter refuses before any hashing, so a password-guessing
flood costs the attacker a 429, not us a CPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict, deque

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway._settings import GatewaySettings
from gateway._store import Account, AccountStore

__all__ = ["SESSION_COOKIE", "Accounts", "LoginLimiter"]

SESSION_COOKIE = "fc_session"
MAX_USERNAME = 64
MAX_PASSWORD = 1024
MIN_PASSWORD = 8
_LIMITER_KEYS = 100_000
_SESSION_CACHE_S = 2.0  # a logout elsewhere takes effect here within this time
_SESSION_CACHE_MAX = 10_000


class LoginLimiter:
    """Failed logins per key (user name, client address) in a sliding window.

    Bounded: the least recently used keys are forgotten beyond ``_LIMITER_KEYS``.
    """

    def __init__(self, attempts: int, window_s: float) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, *keys: str, now: float | None = None) -> float:
        """Seconds until one of ``keys`` may try again; 0 when allowed now."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        for key in keys:
            times = self._failures.get(key)
            if not times:
                continue
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) >= self.attempts:
                wait = max(wait, times[0] + self.window_s - now)
        return wait

    def failed(self, *keys: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in keys:
            times = self._failures.setdefault(key, deque(maxlen=self.attempts))
            times.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > _LIMITER_KEYS:
            self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


def token_hash(token: str) -> bytes:
    """Sessions are stored by the SHA-256 of their token: a database leak yields no cookie."""
    return hashlib.sha256(token.encode()).digest()


class Accounts:
    """Registration, login and sessions over an :class:`AccountStore`."""

    def __init__(self, store: AccountStore, settings: GatewaySettings) -> None:
        self.store = store
        self.settings = settings
        self.hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        self.limiter = LoginLimiter(settings.login_attempts, settings.login_window_s)
        self._dummy: str | None = None
        # Every API call and socket resolves its session: keep recent answers briefly
        # instead of three queries per request.
        self._sessions: OrderedDict[bytes, tuple[float, Account]] = OrderedDict()

    async def hash_password(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def create(self, username: str, password: str, *, is_admin: bool = False) -> int:
        """Raises: NameTaken, StorageError."""
        return await self.store.create_account(
            username, await self.hash_password(password), is_admin=is_admin
        )

    async def check_password(self, username: str, password: str) -> int | None:
        """The account id when the password is right, else ``None``.

        An unknown user name still costs one verification, so timing does not tell
        which user names exist.
        """
        found = await self.store.account_login(username)
        if found is None:
            if self._dummy is None:
                self._dummy = await self.hash_password(secrets.token_urlsafe(16))
            await asyncio.to_thread(self._verify, self._dummy, password)
            return None
        account_id, stored = found
        if not await asyncio.to_thread(self._verify, stored, password):
            return None
        if self.hasher.check_needs_rehash(stored):
            await self.store.set_password_hash(account_id, await self.hash_password(password))
        return account_id

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def new_session(self, account_id: int) -> str:
        """A fresh random session token (the cookie value); only its hash is stored."""
        token = secrets.token_urlsafe(32)
        await self.store.create_session(
            token_hash(token), account_id, time.time() + self.settings.session_ttl_s
        )
        return token

    async def session(self, token: str | None) -> Account | None:
        if not token or len(token) > 128:
            return None
        key = token_hash(token)
        now = time.monotonic()
        cached = self._sessions.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        account = await self.store.session_account(key, time.time())
        if account is None:
            self._sessions.pop(key, None)
            return None
        self._sessions[key] = (now + _SESSION_CACHE_S, account)
        self._sessions.move_to_end(key)
        while len(self._sessions) > _SESSION_CACHE_MAX:
            self._sessions.popitem(last=False)
        return account

    def forget(self, account_id: int) -> None:
        """Drop cached sessions of an account (its participants changed)."""
        for key in [k for k, (_, a) in self._sessions.items() if a.id == account_id]:
            del self._sessions[key]

    async def end_session(self, token: str) -> None:
        self._sessions.pop(token_hash(token), None)
        await self.store.delete_session(token_hash(token))
