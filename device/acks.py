"""PUBACKs of received batches, sent only once an fsync has made them power-safe.

The worker commits a received batch without an fsync (a crash of the process keeps
it, and it is shown at once), then hands its PUBACKs here: they leave, in order, once
the state file is synced past that batch's generation, so after a power cut the broker
still has whatever the state file lost. One fsync at a time runs on a thread of its
own and covers every batch committed before it started (group commit); the worker
does not wait for it: under a busy disk a slow fsync delays PUBACKs, not the next
messages on screen.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from fieldchat.device.context import Part, Shared
from fieldchat.device.link import LinkConnection
from fieldchat.schemas.errors import KeyStoreError

__all__ = ["PowerSafeAcks"]


class PowerSafeAcks(Part):
    """The PUBACKs waiting for their fsync, and the thread that runs it.

    Args:
        shared: the device's state file (its generations and ``sync``).
        wake: asks the worker for a turn (a sync finished: its PUBACKs can leave).
        fail: told when a sync failed (the device stops).
    """

    def __init__(
        self,
        shared: Shared,
        wake: Callable[[], None],
        fail: Callable[[KeyStoreError], None],
    ) -> None:
        super().__init__(shared)
        self._wake = wake
        self._fail = fail
        # (state generation to reach, acks), oldest first.
        self._unacked: deque[tuple[int, list[tuple[LinkConnection, int]]]] = deque()
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fieldchat-sync")
        self._syncing: Future[None] | None = None

    def add(self, acks: list[tuple[LinkConnection, int]]) -> None:
        """PUBACK ``acks`` (of a batch just committed) once a sync covers it (from
        the :meth:`send` that follows)."""
        self._unacked.append((self.state.generation, acks))

    def send(self) -> None:
        """PUBACK, in order, what an fsync has made power-safe; start one for the rest."""
        synced = self.state.synced_generation
        while self._unacked and self._unacked[0][0] <= synced:
            _, acks = self._unacked.popleft()
            for conn, mid in acks:
                if conn.connected:
                    conn.ack(mid)
        if self._unacked and (self._syncing is None or self._syncing.done()):
            self._syncing = self._syncer.submit(self._sync)

    def close(self) -> None:
        """Stop the sync thread (after the fsync it runs, if any)."""
        self._syncer.shutdown()

    def _sync(self) -> None:
        try:
            self.state.sync()
        except KeyStoreError as exc:
            self._fail(exc)  # raised on the worker by its next turn
        self._wake()
