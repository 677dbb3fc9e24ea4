"""One SQLite file with durable transactions: the base of
:class:`~fieldchat.device.state.DeviceState` (mode 0600, WAL, one connection).

Two levels of durability (the WAL makes both atomic):

    transaction()               one fsync at COMMIT: survives a power cut.
    transaction(durable=False)  no fsync: survives a crash of the process (the WAL
                                frames are in the kernel), not a power cut, until the
                                next :meth:`DeviceState.sync` or durable commit.

Whatever must not be lost in a power cut once the outside world has seen it is
synced (one fsync of the WAL, covering every earlier frame) before it can leave:

* a received batch is committed without an fsync and shown, and synced before its
  PUBACKs leave (a power cut in between: the broker delivers it again);
* outbox rows of a transaction opened with ``sync_outbox`` (grants and rosters the
  worker writes, sends in power-safe mode) are synced before they are published;
* a sending chain's reservation (records under ``SEND_CHAIN_PREFIX``) is synced
  before anything of its transaction is published, whatever ``sync_outbox`` says:
  a reservation lost after its steps were used would mean keys and nonces used
  twice (PROTOCOL.md §6.3). It is one record write per ``RESERVE_STEPS`` sends.

So ordinary outbox rows (:meth:`device.client.Device.send` by default) may be
published before their fsync: a power cut can then lose a message the device has
already sent (receivers have it; the sender's history does not), never reuse a step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fieldchat.device.keystore import create_private_file
from fieldchat.device.transaction import StateTransaction
from fieldchat.schemas.errors import ConfigError, KeyStoreError

__all__ = ["CHECKPOINT_INTERVAL_S", "FALLBACK_AUTOCHECKPOINT_PAGES", "StateFile"]

CHECKPOINT_INTERVAL_S = 0.2  # background WAL checkpoints (see checkpoint_in_background)
# With background checkpoints, the committing thread checkpoints only past this many WAL
# pages (SQLite's default is 1,000): a writer that never pauses still bounds the WAL.
FALLBACK_AUTOCHECKPOINT_PAGES = 16_000


class StateFile:
    """An SQLite file in WAL mode with nested transactions, group fsyncs and a
    background checkpointer. Thread-safe; one connection guarded by a re-entrant lock.

    Args:
        path: the file (created mode 0600).
        create: creates or migrates the tables, on the open connection.
        clock: the time written in rows.

    Raises:
        KeyStoreError: from the constructor when the file cannot be opened or is
            readable by others; from any method when SQLite fails.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        create: Callable[[sqlite3.Connection], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path).expanduser()
        self._clock = clock
        create_private_file(self.path, "state file")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            create(self._db)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open state file {self.path}: {exc}") from exc
        except OSError as exc:
            raise KeyStoreError(f"cannot open state file {self.path}: {exc.strerror}") from exc
        self._lock = threading.RLock()
        self._tx = StateTransaction(self._db, clock, self._outbox_written)
        self._lockfile: IO[str] | None = None
        self._depth = 0
        self._undo: list[Callable[[], None]] = []  # see on_rollback
        self._durable = True  # of the open transaction
        self._written = 0  # commits without an fsync so far
        self._synced = 0  # ... of which this many are known durable
        self._txn_outbox = False  # the open transaction added an outbox row
        self._txn_chain = False  # ... or wrote a sending chain's reservation
        self._outbox_gen = 0  # the last commit without fsync whose outbox rows wait for one
        self._chain_gen = 0  # the last commit without fsync that wrote a reservation
        self._sync_lock = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self.commits = 0
        self.fsyncs = 0
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                side.chmod(0o600)

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def transaction(
        self, *, durable: bool = True, sync_outbox: bool = True
    ) -> Iterator[StateTransaction]:
        """One atomic unit; nested calls join the outer transaction (and its durability).

        ``durable``: fsync at COMMIT; without it the commit survives a process crash
        and becomes power-safe at the next :meth:`sync` or durable commit.
        ``sync_outbox`` (without ``durable``): its outbox rows are synced before they
        are published (:attr:`outbox_unsynced`); without it they may leave at once,
        unless the transaction wrote a reservation (see the module docstring).

        Raises:
            KeyStoreError: SQLite failed (the transaction is rolled back).
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._tx
                finally:
                    self._depth -= 1
                return
            try:
                if durable != self._durable:
                    # Takes effect for this connection's next COMMIT (SQLite, PRAGMA
                    # synchronous: in WAL mode NORMAL syncs only at checkpoints).
                    self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise KeyStoreError(f"state file write failed: {exc}") from exc
            self._depth = 1
            self._txn_outbox = self._txn_chain = False
            self._undo = []
            try:
                yield self._tx
            except sqlite3.Error as exc:
                self._rollback()
                raise KeyStoreError(f"state file write failed: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            self._depth = 0
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise KeyStoreError(f"state file write failed: {exc}") from exc
            self._undo = []
            self.commits += 1
            self._written += 1
            if durable:  # the fsync of the WAL covers every earlier frame too
                self._synced = self._written
                return
            if self._txn_chain:
                self._chain_gen = self._written
            if self._txn_outbox and (sync_outbox or self._txn_chain):
                self._outbox_gen = self._written

    def _outbox_written(self) -> None:
        self._txn_outbox = True

    def _reservation_written(self) -> None:
        """The open transaction wrote a sending chain's reservation (synced before
        anything of it is published)."""
        self._txn_chain = True

    def _rollback(self) -> None:
        """Roll the open transaction back, then undo what was adopted in memory with it
        (newest first: the engine's reservations, see :meth:`on_rollback`)."""
        self._depth = 0
        undo, self._undo = self._undo, []
        try:
            # SQLite may have rolled back by itself (after SQLITE_FULL or SQLITE_IOERR).
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        finally:
            for step in reversed(undo):
                step()

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` if the open transaction rolls back (the KeyStore protocol).

        Outside a transaction the last :meth:`save` has committed: nothing to undo.
        """
        if self._depth:
            self._undo.append(undo)

    @property
    def unsynced(self) -> bool:
        """Whether a commit since the last fsync is not power-safe yet."""
        return self._synced != self._written

    @property
    def outbox_unsynced(self) -> bool:
        """Whether outbox rows that must be synced before publishing wait for an fsync."""
        return self._synced < self._outbox_gen

    @property
    def generation(self) -> int:
        """Commits so far (without an fsync): compare with :attr:`synced_generation`."""
        return self._written

    @property
    def synced_generation(self) -> int:
        """Commits so far known durable: every one up to the last :meth:`sync`."""
        return self._synced

    @property
    def reserving(self) -> bool:
        """Whether the open transaction wrote a sending chain's reservation (read it
        inside the transaction)."""
        return self._txn_chain

    @property
    def reservation_unsynced(self) -> bool:
        """Whether a sending chain's reservation was committed without an fsync."""
        return self._synced < self._chain_gen

    def sync(self) -> None:
        """Make every commit so far durable: one fsync of the WAL, if anything is pending.

        The fsync runs outside the connection lock, so senders and the worker keep
        committing meanwhile; concurrent callers share one fsync where they can.

        Raises:
            KeyStoreError: the fsync failed.
        """
        with self._sync_lock:
            with self._lock:
                target = self._written
                if self._synced >= target:
                    return
            try:
                # Opened per call: SQLite may replace the WAL file between calls (a new
                # inode when the last connection of another process closes it).
                fd = os.open(f"{self.path}-wal", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise KeyStoreError(f"state file sync failed: {exc.strerror}") from exc
            with self._lock:
                self.fsyncs += 1
                self._synced = max(self._synced, target)

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        try:
            with self._lock:
                return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise KeyStoreError(f"state file read failed: {exc}") from exc

    def lock(self) -> None:
        """Claim the state file for this process (one connection per identity).

        Raises:
            ConfigError: another process holds it.
        """
        if self._lockfile is not None:
            return
        handle = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"state file {self.path} is in use by another fieldchat process"
            ) from None
        self._lockfile = handle

    def checkpoint_in_background(self, interval: float = CHECKPOINT_INTERVAL_S) -> None:
        """Copy the WAL into the database from a thread of its own, every ``interval``.

        SQLite otherwise checkpoints in whichever thread commits the 1,000th WAL page:
        a ``send`` or a received batch then waits for 4 MB of copying and two fsyncs
        (up to 17 ms here, every ~160 sends). A PASSIVE checkpoint on a second connection
        runs beside the writers; it copies committed pages only, so what is durable
        does not change (it fsyncs the WAL first: if anything, more is).
        """
        if self._checkpointer is not None:
            return
        with self._lock:
            self._db.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_AUTOCHECKPOINT_PAGES}")
        self._checkpointer = threading.Thread(
            target=self._checkpoints, args=(interval,), name="fieldchat-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoints(self, interval: float) -> None:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error:
            return  # the committing threads' fallback checkpoints still bound the WAL
        try:
            while not self._checkpoint_stop.wait(interval):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    continue  # busy or I/O: the next round (or the fallback) catches up
        finally:
            db.close()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            self._checkpointer.join(10)
            self._checkpointer = None
        with self._lock:
            self._db.close()
            if self._lockfile is not None:
                self._lockfile.close()
                self._lockfile = None
