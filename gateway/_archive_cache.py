"""What the archiver keeps in memory of the archive: parsed rosters and bundles, each
conversation's newest epoch, and the thread pool that parses and verifies.

Rosters and bundles are append-only in the archive (a bundle only ever replaced by a
newer one), so a cached answer stays right; each cache is bounded (least recently
used out first).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from fieldchat.gateway._store import HistoryStore
from fieldchat.schemas import Bundle, Roster

__all__ = ["CACHE_MAX", "ArchiveCache", "Lru", "VerifyPool"]

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")

CACHE_MAX = 20_000


class Lru(OrderedDict[K, V], Generic[K, V]):
    """A dict that forgets its least recently put entries beyond ``CACHE_MAX``."""

    def put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > CACHE_MAX:
            self.popitem(last=False)


class VerifyPool:
    """Threads for signature checks (PyNaCl releases the GIL while libsodium verifies,
    so threads verify in parallel)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fc-verify")

    async def run(self, fn: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ArchiveCache:
    """Archived rosters, bundles and heads, read through from the store."""

    def __init__(self, store: HistoryStore, pool: VerifyPool) -> None:
        self._store = store
        self._pool = pool
        self.rosters: Lru[tuple[str, int], Roster] = Lru()
        self.bundles: Lru[str, Bundle] = Lru()
        self._heads: Lru[str, int] = Lru()  # cid -> the newest archived epoch seen here

    async def roster(self, cid: str, epoch: int) -> Roster | None:
        """The archived roster of ``cid`` at ``epoch``."""
        key = (cid, epoch)
        found = self.rosters.get(key)
        if found is None:
            data = await self._store.roster(cid, epoch)
            if data is None:
                return None
            found = await self._pool.run(Roster.from_bytes, data)
            self.rosters.put(key, found)
        return found

    async def bundle(self, pid: str) -> Bundle | None:
        """The newest archived bundle of ``pid``."""
        found = self.bundles.get(pid)
        if found is None:
            data = await self._store.bundle(pid)
            if data is None:
                return None
            found = await self._pool.run(Bundle.from_bytes, data)
            self.bundles.put(pid, found)
        return found

    def learn_bundle(self, bundle: Bundle) -> None:
        """Keep a bundle being archived (or stored by the API) unless a newer one is."""
        known = self.bundles.get(bundle.pid)
        if known is None or known.created_at < bundle.created_at:
            self.bundles.put(bundle.pid, bundle)

    def adopted(self, roster: Roster) -> None:
        """A roster is being archived: keep it, and its epoch as the head if newer."""
        self.rosters.put((roster.cid, roster.epoch), roster)
        self._raise_head(roster.cid, roster.epoch)

    def _raise_head(self, cid: str, epoch: int) -> None:
        known = self._heads.get(cid)
        if known is None or known < epoch:
            self._heads.put(cid, epoch)

    async def head(self, cid: str) -> int | None:
        """The newest archived epoch of ``cid`` (the archive only grows)."""
        known = self._heads.get(cid)
        if known is None:
            head = await self._store.roster_head(cid)
            if head is None:
                return None
            known = head[0]
            self._raise_head(cid, known)
        return known
