"""Web accounts: argon2id password hashes, login and registration limits, device
cookies, server-side sessions.

Hashing and verifying run in a worker thread (argon2 is deliberately slow and
memory-hard). Every attempt takes a slot of its limits *before* any hashing, so a
flood of concurrent guesses is refused at once instead of all being hashed (issue 13:
24 concurrent guesses were all hashed when failures were only recorded afterwards).

Logins follow OWASP's device cookies ("Slow Down Online Guessing Attacks with Device
Cookies"): after a successful login the browser gets a signed, long-lived cookie
naming the user. A login that carries a valid one for the user it names is limited per
cookie only; every other login is limited per user name and per client address. So an
attacker's failures lock out untrusted clients for that user, never the user's own
browser with the right password.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from fieldchat.gateway._errors import TooManyRequests
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._store import Account, AccountStore

__all__ = [
    "DEVICE_COOKIE",
    "SESSION_COOKIE",
    "Accounts",
    "Attempt",
    "Limiter",
    "address_key",
]

SESSION_COOKIE = "fc_session"
DEVICE_COOKIE = "fc_device"
MAX_USERNAME = 64
MAX_PASSWORD = 1024
MIN_PASSWORD = 8
_LIMITER_KEYS = 100_000
_BUSY_RETRY_S = 1.0  # Retry-After while the slots are taken by attempts in flight
_SESSION_CACHE_S = 2.0  # a logout elsewhere takes effect here within this time
_SESSION_CACHE_MAX = 10_000
_DEVICE_KEY_NAME = "device-cookie-v1"
_DEVICE_LABEL = b"fieldchat-device-cookie-v1\n"
_MAX_DEVICE_COOKIE = 512
_IPV6_PREFIX = 64  # one subscriber usually holds a whole /64: limit it as one address


def address_key(host: str | None) -> str:
    """The limiter key of a client address: the address, or its /64 for IPv6."""
    if not host:
        return "addr:?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"addr:{host[:64]}"
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return f"addr:{mapped}"
        return f"addr:{ipaddress.ip_network(f'{ip}/{_IPV6_PREFIX}', strict=False)}"
    return f"addr:{ip}"


@dataclass(slots=True)
class _Window:
    times: deque[float]
    busy: int = 0


@dataclass(slots=True)
class Attempt:
    """A slot taken in one or more limits; :meth:`done` gives it back."""

    limiter: Limiter
    keys: tuple[str, ...]
    finished: bool = field(default=False)

    def done(self, *, record: bool) -> None:
        """End the attempt; ``record``: it counts against the limits (a failed login,
        any registration). Idempotent."""
        if not self.finished:
            self.finished = True
            self.limiter.finish(self.keys, record=record)


class Limiter:
    """At most ``attempts`` per key in a sliding window of ``window_s`` seconds, where
    attempts still in flight count as if they had failed already.

    Bounded: beyond ``max_keys`` the least recently used keys are forgotten.
    """

    def __init__(
        self,
        attempts: int,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = _LIMITER_KEYS,
    ) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.clock = clock
        self.max_keys = max_keys
        self._keys: OrderedDict[str, _Window] = OrderedDict()

    def _window(self, key: str, now: float) -> _Window:
        found = self._keys.get(key)
        if found is None:
            found = self._keys[key] = _Window(deque(maxlen=self.attempts))
        times = found.times
        while times and times[0] <= now - self.window_s:
            times.popleft()
        self._keys.move_to_end(key)
        return found

    def acquire(self, *keys: str) -> Attempt:
        """Take a slot in every key's limit.

        Raises:
            TooManyRequests: a key is full (recorded attempts plus those in flight).
        """
        now = self.clock()
        wait = 0.0
        windows = [self._window(key, now) for key in keys]
        for w in windows:
            if len(w.times) + w.busy >= self.attempts:
                if len(w.times) >= self.attempts:
                    wait = max(wait, w.times[0] + self.window_s - now)
                else:
                    wait = max(wait, _BUSY_RETRY_S)
        if wait > 0:
            raise TooManyRequests("too many attempts; wait", retry_after=wait)
        for w in windows:
            w.busy += 1
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return Attempt(self, keys)

    def finish(self, keys: tuple[str, ...], *, record: bool) -> None:
        now = self.clock()
        for key in keys:
            w = self._window(key, now)
            w.busy = max(w.busy - 1, 0)
            if record:
                w.times.append(now)

    def forget(self, key: str) -> None:
        """Clear a key's record (a device cookie whose holder just logged in)."""
        w = self._keys.get(key)
        if w is not None:
            w.times.clear()


def token_hash(token: str) -> bytes:
    """Sessions are stored by the SHA-256 of their token: a database leak yields no cookie."""
    return hashlib.sha256(token.encode()).digest()


class Accounts:
    """Registration, login (limits, device cookies) and sessions over an
    :class:`AccountStore`."""

    def __init__(self, store: AccountStore, settings: GatewaySettings) -> None:
        self.store = store
        self.settings = settings
        self.hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        self.logins = Limiter(settings.login_attempts, settings.login_window_s)
        self.registrations = Limiter(settings.register_attempts, settings.register_window_s)
        self._device_key: bytes | None = None
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

    async def session(self, token: str | None, *, fresh: bool = False) -> Account | None:
        """The account of a session token, from a cache of ``_SESSION_CACHE_S`` unless
        ``fresh`` (a WebSocket resolves it afresh: its participants hold for the
        socket's life, and a claim made through another gateway must count)."""
        if not token or len(token) > 128:
            return None
        key = token_hash(token)
        now = time.monotonic()
        cached = self._sessions.get(key)
        if cached is not None and cached[0] > now and not fresh:
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

    # -- device cookies ------------------------------------------------------------------

    async def _mac_key(self) -> bytes:
        if self._device_key is None:  # one key for every gateway on this database
            self._device_key = await self.store.secret(_DEVICE_KEY_NAME, secrets.token_bytes(32))
        return self._device_key

    async def device_cookie(self, username: str, *, now: float | None = None) -> str:
        """A signed cookie naming ``username`` (OWASP device cookie), valid for
        ``device_cookie_ttl_s``."""
        now = time.time() if now is None else now
        body = f"{username.lower()}\n{int(now)}\n{secrets.token_hex(8)}".encode()
        mac = hmac.new(await self._mac_key(), _DEVICE_LABEL + body, hashlib.sha256).digest()
        return f"{_b64(body)}.{_b64(mac[:16])}"

    async def device_key(
        self, cookie: str | None, username: str, *, now: float | None = None
    ) -> str | None:
        """The limiter key of ``cookie`` when it is a valid device cookie of
        ``username``; ``None`` otherwise (then the login is an untrusted client's)."""
        if not cookie or len(cookie) > _MAX_DEVICE_COOKIE or cookie.count(".") != 1:
            return None
        body_text, mac_text = cookie.split(".")
        try:
            body, mac = _unb64(body_text), _unb64(mac_text)
        except (binascii.Error, ValueError):
            return None
        good = hmac.new(await self._mac_key(), _DEVICE_LABEL + body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, good[:16]):
            return None
        name, _, rest = body.decode(errors="replace").partition("\n")
        issued = rest.partition("\n")[0]
        now = time.time() if now is None else now
        if name != username.lower() or not issued.isdigit():
            return None
        if int(issued) + self.settings.device_cookie_ttl_s < now:
            return None
        return "device:" + hashlib.sha256(cookie.encode()).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
