"""The archiver's cache of the archive, over a store that counts its reads: each bundle
and head is read once, a newer bundle replaces an older one and never the reverse."""

from __future__ import annotations

from typing import Any

from fieldchat.gateway._archive_cache import ArchiveCache, VerifyPool
from fieldchat.schemas import Bundle, Topics
from tests.gateway._support import Party

CID = "a" * 25 + "a"


class _Store:
    def __init__(self, bundles: dict[str, bytes]) -> None:
        self.bundles = bundles
        self.reads: list[tuple[str, Any]] = []

    async def bundle(self, pid: str) -> bytes | None:
        self.reads.append(("bundle", pid))
        return self.bundles.get(pid)

    async def roster_head(self, cid: str) -> tuple[int, bytes] | None:
        self.reads.append(("head", cid))
        return (4, b"roster") if cid == CID else None


async def test_bundles_and_heads_are_read_once_and_newer_bundles_win() -> None:
    party = Party(Topics("x"), post_quantum=False)
    store = _Store({party.pid: party.bundle})
    pool = VerifyPool(1)
    try:
        # a stand-in for the two reads the cache makes
        cache = ArchiveCache(store, pool)  # type: ignore[arg-type]
        first = await cache.bundle(party.pid)
        assert first is not None and first.pid == party.pid
        assert await cache.bundle(party.pid) is first
        assert await cache.bundle("z" * 26) is None
        assert await cache.bundle("z" * 26) is None  # a miss is asked again
        missing = ("bundle", "z" * 26)
        assert store.reads == [("bundle", party.pid), missing, missing]

        older = Bundle.from_bytes(party.bundle).model_copy(update={"created_at": 1})
        cache.learn_bundle(older)
        assert await cache.bundle(party.pid) is first

        assert await cache.head(CID) == 4
        assert await cache.head(CID) == 4
        assert await cache.head("b" * 26) is None
        assert store.reads.count(("head", CID)) == 1
    finally:
        pool.close()
