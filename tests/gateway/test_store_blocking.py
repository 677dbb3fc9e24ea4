"""A SQLite database that waits (another process holds its lock, a cold SD card) must
not freeze the gateway: every call of the store that can wait runs off the event loop."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from fieldchat.gateway import ArchiveBatch, open_store
from tests.gateway.test_store import CID, env

HOLD_S = 1.5  # how long another connection keeps the database locked
LOOP_GAP_MAX_S = 0.5  # the longest the event loop may go without running a coroutine


async def _longest_gap(until: asyncio.Future[Any]) -> float:
    """Tick every 10 ms until ``until`` is done; the longest wait between two ticks."""
    longest = 0.0
    last = time.monotonic()
    while not until.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
    return longest


# Another process takes every WAL lock of the database (the write, checkpoint, recovery
# and read locks: bytes 120-127 of the -shm file, as SQLite's unix VFS locks them), as a
# writer, a checkpoint or a recovery of another process holds them; readers and writers
# of this process wait until it lets go.
_HOLD_LOCKS = """
import fcntl, sys, time
with open(sys.argv[1], "r+b") as shm:
    fcntl.lockf(shm, fcntl.LOCK_EX, 8, 120)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


async def _hold_locks(path: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLD_LOCKS,
        f"{path}-shm",
        str(HOLD_S),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"locked\n"
    return proc


async def test_a_locked_sqlite_database_does_not_freeze_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = open_store(f"sqlite:///{path}")
    try:
        await store.migrate()
        await store.commit(ArchiveBatch(envelopes=[env(i) for i in range(3)]))
        assert len(await store.history(CID, limit=10)) == 3  # connections opened

        holder = await _hold_locks(path)
        release = asyncio.create_task(holder.wait())
        read = asyncio.create_task(store.history(CID, limit=10))
        member = asyncio.create_task(store.was_member(CID, ["x" * 26]))
        archive = asyncio.create_task(store.commit(ArchiveBatch(envelopes=[env(3)])))
        done = asyncio.gather(read, member, archive, release)
        assert await _longest_gap(done) < LOOP_GAP_MAX_S
        page, is_member, archived, _ = await done
        # once the lock is gone every call completes as usual
        assert [e.step for e in page][-3:] == [2, 1, 0]  # step 3 too if its commit went first
        assert is_member is False
        assert archived.archived == 1
    finally:
        await store.close()
