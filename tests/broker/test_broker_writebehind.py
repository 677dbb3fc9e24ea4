"""The write-behind thread takes typed operations only (issue 15 item 4)."""

from __future__ import annotations

import asyncio

import pytest

from fieldchat.broker import Store
from fieldchat.broker._writebehind import QueueAdd, RetainSet, WriteBehind
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE

T = Topics()


async def test_an_unknown_store_operation_never_reaches_the_writer_thread(tmp_path):
    # Before: put("queue+", …) took any string; an unknown one raised KeyError in the
    # thread, which died, and every later PUBACK waiting for a commit never went.
    path = tmp_path / "broker.sqlite3"
    writer = WriteBehind(path, asyncio.get_running_loop())
    try:
        with pytest.raises(TypeError, match="not a broker store operation"):
            writer.put("queue+")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a broker store operation"):
            writer.put(("retain", T.bundle(ALICE.pid), b"\x01", 1))  # type: ignore[arg-type]
        writer.put(RetainSet(T.bundle(ALICE.pid), b"\x01\x02", 1))
        writer.put(QueueAdd(ALICE.pid, 7, T.inbox(ALICE.pid), b"\xff", 1, 0, b"", None, 0))
        async with asyncio.timeout(10):
            await writer.committed()
        assert writer.alive
    finally:
        writer.close()
    with Store(path) as store:
        assert store.retained() == {T.bundle(ALICE.pid): (b"\x01\x02", 1)}
        assert [(m.seq, m.payload) for m in store.queued()[ALICE.pid]] == [(7, b"\xff")]
