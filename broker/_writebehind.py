"""The broker's writes to its store, as typed operations applied by one thread.

Each operation is a :class:`~typing.NamedTuple` whose fields are the parameters of
its one SQL statement (in column order), so the thread hands a run of operations of
one type to ``executemany`` as they are. :meth:`WriteBehind.put` refuses anything
that is not one of them, in the caller's thread: before issue 15 operations were
strings (``put("queue+", …)``) and an unknown one raised ``KeyError`` inside the
thread, which then died and no PUBACK that waited for a commit was ever sent.

Group commit: the thread applies what was put since its last batch in one
transaction; the broker sends a PUBACK for a QoS 1 message only after the batch
holding its queued copies has committed, so an acknowledged message survives a
SIGKILL (WAL, ``synchronous=NORMAL``: durable against a process crash, not a power
cut, which would need ``FULL`` and an fsync per batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import NamedTuple

from fieldchat.broker._errors import BrokerError
from fieldchat.broker._store import connect

__all__ = [
    "FoundedSave",
    "QueueAdd",
    "QueueClear",
    "QueueRemove",
    "QueueSent",
    "RetainClear",
    "RetainSet",
    "RosterSave",
    "SessionDelete",
    "SessionSave",
    "StoreOp",
    "WriteBehind",
]

log = logging.getLogger(__name__)


class QueueAdd(NamedTuple):
    """A queued (or in-flight, ``sent`` = its packet id) copy for a persistent session."""

    client_id: str
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: int
    props: bytes
    expires_at: float | None
    sent: int


class QueueSent(NamedTuple):
    """A queued copy went out under packet id ``sent`` (resent with DUP after a restart)."""

    sent: int
    client_id: str
    seq: int


class QueueRemove(NamedTuple):
    """A copy was acknowledged, expired, or dropped from a full queue."""

    client_id: str
    seq: int


class QueueClear(NamedTuple):
    """Every copy of a session that ended."""

    client_id: str


class RetainSet(NamedTuple):
    topic: str
    payload: bytes
    qos: int


class RetainClear(NamedTuple):
    topic: str


class SessionSave(NamedTuple):
    """A persistent session: its subscriptions (JSON) and expiry (``expires_at``:
    when an offline session ends; None while connected, or never)."""

    client_id: str
    username: str
    subscriptions: str
    expiry: int
    expires_at: float | None


class SessionDelete(NamedTuple):
    client_id: str


class RosterSave(NamedTuple):
    """The current roster of a conversation (the source of membership)."""

    cid: str
    epoch: int
    data: bytes


class FoundedSave(NamedTuple):
    """``pid`` founded ``cid`` at ``at`` (the founding quota survives a restart)."""

    cid: str
    pid: str
    at: float


StoreOp = (
    QueueAdd
    | QueueSent
    | QueueRemove
    | QueueClear
    | RetainSet
    | RetainClear
    | SessionSave
    | SessionDelete
    | RosterSave
    | FoundedSave
)

# The one statement of each operation; consecutive operations of a type are batched.
_SQL: dict[type[StoreOp], str] = {
    QueueAdd: "INSERT OR REPLACE INTO queue VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
    QueueSent: "UPDATE queue SET sent=? WHERE client_id=? AND seq=?",
    QueueRemove: "DELETE FROM queue WHERE client_id=? AND seq=?",
    QueueClear: "DELETE FROM queue WHERE client_id=?",
    RetainSet: "INSERT OR REPLACE INTO retained VALUES(?, ?, ?)",
    RetainClear: "DELETE FROM retained WHERE topic=?",
    SessionSave: "INSERT OR REPLACE INTO sessions VALUES(?, ?, ?, ?, ?)",
    SessionDelete: "DELETE FROM sessions WHERE client_id=?",
    RosterSave: "INSERT OR REPLACE INTO rosters VALUES(?, ?, ?)",
    FoundedSave: "INSERT OR REPLACE INTO founded VALUES(?, ?, ?)",
}


class WriteBehind:
    """A thread applying the broker's writes in group-committed batches.

    :meth:`put` never blocks the event loop; :meth:`committed` returns a future that
    resolves once everything put so far is on disk (or fails with
    :class:`BrokerError` if the batch could not be written: the broker then withholds
    PUBACKs rather than acknowledge what it did not store).
    """

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = connect(path)
        self._loop = loop
        self._cond = threading.Condition()
        self._ops: list[StoreOp] = []
        self._waiter: asyncio.Future[None] | None = None
        self._running = False
        self._running_waiter: asyncio.Future[None] | None = None
        self._closing = False
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="broker-store", daemon=True)
        self._thread.start()

    def put(self, op: StoreOp) -> None:
        """Queue ``op`` for the next batch.

        Raises:
            TypeError: ``op`` is not one of the operations above (it never reaches
                the thread).
        """
        if type(op) not in _SQL:
            raise TypeError(f"not a broker store operation: {op!r:.80}")
        with self._cond:
            self._ops.append(op)
            if len(self._ops) == 1:
                self._cond.notify()

    def committed(self) -> asyncio.Future[None]:
        """A future for the commit of every operation put so far."""
        with self._cond:
            if self._ops:
                if self._waiter is None:
                    self._waiter = self._loop.create_future()
                return self._waiter
            if self._running:
                if self._running_waiter is None:
                    self._running_waiter = self._loop.create_future()
                return self._running_waiter
        done: asyncio.Future[None] = self._loop.create_future()
        done.set_result(None)
        return done

    @property
    def alive(self) -> bool:
        """Whether the thread is still applying operations (it stops only at :meth:`close`)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Write what is pending, then stop the thread and close the connection."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self._conn.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    self._cond.wait()
                if not self._ops and self._closing:
                    return
                ops, self._ops = self._ops, []
                self._running_waiter, self._waiter = self._waiter, None
                self._running = True
            error = self._apply(ops)
            with self._cond:
                waiter, self._running_waiter = self._running_waiter, None
                self._running = False
                self.batches += 1
            if waiter is not None:
                try:
                    self._loop.call_soon_threadsafe(_resolve, waiter, error)
                except RuntimeError:  # the loop closed while we were writing
                    log.debug("store batch committed after the event loop closed")

    def _apply(self, ops: list[StoreOp]) -> BaseException | None:
        try:
            self._conn.execute("BEGIN")
            i = 0
            while i < len(ops):
                kind = type(ops[i])
                j = i
                while j < len(ops) and type(ops[j]) is kind:
                    j += 1
                self._conn.executemany(_SQL[kind], ops[i:j])
                i = j
            self._conn.execute("COMMIT")
        except Exception as exc:  # the thread's loop: fail this batch, keep serving
            log.exception("broker store write failed; %d operations lost", len(ops))
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            return BrokerError(f"store write failed: {exc}")
        return None


def _resolve(waiter: asyncio.Future[None], error: BaseException | None) -> None:
    if waiter.done():
        return
    if error is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(error)
