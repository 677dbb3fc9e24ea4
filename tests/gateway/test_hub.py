"""The live feed's start: the first sockets on a gateway read where it starts once."""

from __future__ import annotations

import asyncio
import time

from fieldchat.gateway import ArchiveBatch
from fieldchat.gateway._hub import Hub
from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._store import NewEnvelope, RosterRecord

CID = "a" * 25 + "a"
ALICE = "c" * 25 + "a"
BOB = "d" * 25 + "a"


def envelope(step: int) -> NewEnvelope:
    return NewEnvelope(
        cid=CID,
        epoch=0,
        sender=0,
        sender_pid=ALICE,
        chain=0,
        step=step,
        data=b"\x01\x81" + bytes([step]) * 40,
        received_at=time.time(),
    )


async def test_two_first_sockets_at_once_do_not_move_the_feed_past_rows_not_delivered(store):
    """Two sockets subscribe while none is connected: both used to read where the feed
    starts, and the later read overwrote the earlier start. Rows committed between the
    two reads then reached neither socket live (the first had registered already)."""
    roster = RosterRecord(CID, 0, b"\x00" * 32, (ALICE, BOB), b"roster")
    await store.commit(ArchiveBatch(rosters=[roster]))
    hub = Hub(store, GatewayMetrics(), poll_s=60, queue_max=100)

    read_max_seq = store.max_seq
    gate = asyncio.Event()
    calls = 0

    async def gated_max_seq() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second socket's read waits until rows were committed
            await gate.wait()
        return await read_max_seq()

    store.max_seq = gated_max_seq
    first = asyncio.create_task(hub.subscribe([ALICE]))
    second = asyncio.create_task(hub.subscribe([BOB]))
    alice = await asyncio.wait_for(first, 10)
    await store.commit(ArchiveBatch(envelopes=[envelope(i) for i in range(5)]))
    gate.set()
    bob = await asyncio.wait_for(second, 10)

    await hub._deliver()
    for sub in (alice, bob):
        got = []
        while not sub.queue.empty():
            event = sub.queue.get_nowait()
            if event.envelope is not None:
                got.append(event.envelope.step)
        assert got == [0, 1, 2, 3, 4]
