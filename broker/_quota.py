"""Quotas of the broker, as pure objects over an injected clock (``now`` in seconds).

* :class:`Throttle`: two token buckets (PUBLISH packets and their bytes) per
  participant; the connection stops reading its socket for as long as
  :meth:`Throttle.take` says, so a flood is slowed by TCP pushback, never dropped.
* :class:`FoundingQuota`: conversations founded per participant in a sliding window.
* :class:`Pending`: connections waiting for their CONNECT, per address and in all;
  :class:`Admission`: those and every other connection (``max_connections``).

Limits and their defaults: :class:`broker._config.Limits` (docs/broker.md, "Limits").
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from fieldchat.broker._outlet import Close

__all__ = [
    "Admission",
    "FoundingQuota",
    "Limit",
    "Pending",
    "Throttle",
    "TokenBucket",
    "address_key",
]

T = TypeVar("T")

_IPV6_SITE_PREFIX = 64  # one subscriber usually holds a whole /64


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; starts full.

    :meth:`take` always takes (the packet was already read) and may leave a debt;
    it returns how long to wait until the debt is paid.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens; return the seconds to wait (0: none)."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Limit(enum.StrEnum):
    """Which bucket of a :class:`Throttle` made a client wait (``throttled{limit}``)."""

    MESSAGES = "messages"
    BYTES = "bytes"


class Throttle:
    """The outbound rate of one participant: PUBLISH packets and bytes."""

    __slots__ = ("_bytes", "_messages")

    def __init__(
        self,
        now: float,
        *,
        messages_per_s: float,
        messages_burst: float,
        bytes_per_s: float,
        bytes_burst: float,
    ) -> None:
        self._messages = (
            TokenBucket(messages_per_s, messages_burst, now) if messages_per_s > 0 else None
        )
        self._bytes = TokenBucket(bytes_per_s, bytes_burst, now) if bytes_per_s > 0 else None

    def take(self, size: int, now: float) -> tuple[float, Limit]:
        """Charge one PUBLISH of ``size`` bytes: ``(seconds to wait, the limit that binds)``."""
        by_count = self._messages.take(1, now) if self._messages is not None else 0.0
        by_size = self._bytes.take(size, now) if self._bytes is not None else 0.0
        if by_size > by_count:
            return by_size, Limit.BYTES
        return by_count, Limit.MESSAGES


class FoundingQuota:
    """At most ``limit`` conversations founded per participant in ``window_s`` (0: no limit)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: dict[str, deque[float]] = {}

    def _recent(self, pid: str, now: float) -> deque[float] | None:
        times = self._times.get(pid)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._times[pid]
            return None
        return times

    def allows(self, pid: str, now: float) -> bool:
        if not self.limit:
            return True
        times = self._recent(pid, now)
        return times is None or len(times) < self.limit

    def record(self, pid: str, at: float) -> None:
        times = self._times.setdefault(pid, deque())
        times.append(at)
        if self.limit and len(times) > self.limit:  # bounded even when fed old rows
            times.popleft()

    def load(self, rows: Iterable[tuple[str, float]], now: float) -> None:
        """Start from stored ``(pid, founded at)`` rows (a restart keeps the window)."""
        for pid, at in sorted(rows, key=lambda row: row[1]):
            if at > now - self.window_s:
                self.record(pid, at)


def address_key(host: str) -> str:
    """The unit of the per-address cap: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _IPV6_SITE_PREFIX), strict=False))
    return str(address)


class Pending(Generic[T]):
    """Connections that have not finished their CONNECT.

    :meth:`admit` refuses an address over ``per_address`` (0: no cap) and, when
    ``total`` are waiting, evicts the oldest: a flood from many addresses then ages
    its own sockets out instead of keeping a real client from logging in.
    """

    def __init__(self, *, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._waiting: dict[T, str] = {}  # insertion order = age
        self._by_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def count(self, key: str) -> int:
        return self._by_address.get(key, 0)

    def admit(self, item: T, key: str) -> tuple[bool, T | None]:
        """``(admitted, evicted item or None)``; the evicted one is no longer counted."""
        if self.per_address and self._by_address.get(key, 0) >= self.per_address:
            return False, None
        evicted = None
        if len(self._waiting) >= self.total:
            evicted = next(iter(self._waiting))
            self.discard(evicted)
        self._waiting[item] = key
        self._by_address[key] = self._by_address.get(key, 0) + 1
        return True, evicted

    def discard(self, item: T) -> None:
        key = self._waiting.pop(item, None)
        if key is None:
            return
        left = self._by_address[key] - 1
        if left:
            self._by_address[key] = left
        else:
            del self._by_address[key]


class Admission(Generic[T]):
    """The broker's sockets: all of them (``max_connections``) and, among them, those
    still waiting for their CONNECT (:class:`Pending`).

    When every connection is taken, a new socket is refused unless the waiting ones
    are at their cap too: then the oldest waiting one makes room (:meth:`admit`), so
    a flood of idle sockets can never refuse a real client's login.
    """

    def __init__(self, *, max_connections: int, per_address: int, pending: int) -> None:
        self.max_connections = max_connections
        self.connections: set[T] = set()
        self.pending: Pending[T] = Pending(per_address=per_address, total=pending)

    def admit(self, item: T, key: str) -> tuple[Close | None, T | None]:
        """``(refusal, evicted)``: with a refusal nothing changed; else ``item`` is
        counted and waits, and ``evicted`` is a waiting item that lost its place
        (close it)."""
        pending = self.pending
        if len(self.connections) >= self.max_connections and len(pending) < pending.total:
            return Close.MAX_CONNECTIONS, None
        admitted, evicted = pending.admit(item, key)
        if not admitted:
            return Close.PENDING_PER_ADDRESS, None
        self.connections.add(item)
        return None, evicted

    def connected(self, item: T) -> None:
        """``item`` sent its CONNECT: it no longer waits."""
        self.pending.discard(item)

    def leave(self, item: T) -> None:
        self.connections.discard(item)
        self.pending.discard(item)
