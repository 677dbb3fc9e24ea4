"""The one way into the database: run a query function, off the event loop.

Every query and transaction of the store is a plain function of a SQLAlchemy
:class:`~sqlalchemy.engine.Connection` (``gateway/_sql_*.py``), written once for both
engines. A :class:`Database` runs it:

* **SQLite** (:class:`SqliteDatabase`): in threads, never on the event loop. A SQLite
  call can wait: for another process's lock (up to the busy timeout), a checkpoint, or
  a cold SD card; on the loop that wait froze every socket of the gateway. Reads run on
  a small pool of reader threads, each with its own query-only connection; every write
  runs in the one writer thread, on one connection, in a ``BEGIN IMMEDIATE``
  transaction (one writer: a transaction never has to upgrade its lock and fail with
  "database is locked"; readers go on in parallel under WAL). One thread hop per
  operation, whatever it holds (through aiosqlite a commit was ≈ 8).
* **PostgreSQL** (:class:`PostgresDatabase`): asyncpg, the function run through
  ``AsyncConnection.run_sync`` (no thread: SQLAlchemy's greenlet bridge awaits each
  statement on the loop).

Driver and SQLAlchemy errors become :class:`StorageError` here, once.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from fieldchat.gateway._errors import StorageError

__all__ = ["Database", "PostgresDatabase", "SqliteDatabase"]

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_S = 10.0  # how long a SQLite call waits for another connection's lock
READ_THREADS = 2  # SQLite reader threads: one may wait for a lock while the other reads


@asynccontextmanager
async def _mapped(what: str) -> AsyncIterator[None]:
    """Map driver and SQLAlchemy errors to :class:`StorageError` once, here."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise StorageError(f"database error while {what}: {type(exc).__name__}") from exc


class Database(Protocol):
    """Runs query functions ``fn(connection, *args)``; both engines implement it."""

    async def read(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn`` for reading (no transaction to commit).

        Raises:
            StorageError: the database failed (``what`` says what was being done).
        """
        ...

    async def write(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn`` in one transaction, committed when it returns.

        Raises:
            StorageError: nothing was written.
        """
        ...

    async def write_unflushed(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Like :meth:`write`, for one statement whose last fraction of a second a
        database crash may forget (request nonces): PostgreSQL does not wait for its WAL
        flush.

        Raises:
            StorageError: nothing was written.
        """
        ...

    async def close(self) -> None: ...


class SqliteDatabase:
    """One SQLite file in WAL mode, read and written in threads (see module docstring)."""

    def __init__(self, path: str, *, readers: int = READ_THREADS) -> None:
        self.path = path
        url = f"sqlite:///{path}"
        args = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
        # NullPool: each thread keeps its connection open for its life (below).
        self._write_engine = create_engine(url, poolclass=NullPool, connect_args=args)
        self._read_engine = create_engine(url, poolclass=NullPool, connect_args=args)
        event.listen(self._write_engine, "connect", _writer_pragmas)
        event.listen(self._write_engine, "begin", _begin_immediate)
        event.listen(self._read_engine, "connect", _reader_pragmas)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fc-sqlite-write")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="fc-sqlite-read")
        self._local = threading.local()  # this thread's Connection
        self._opened: list[Connection] = []
        self._opened_lock = threading.Lock()

    def _connection(self, engine: Engine) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = engine.connect()
            self._local.conn = conn
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    def _read_here(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:  # noqa: ANN401
        """In a reader thread: each statement sees the newest commit (autocommit)."""
        conn = self._connection(self._read_engine)
        try:
            return fn(conn, *args, **kwargs)
        finally:
            conn.rollback()  # ends SQLAlchemy's transaction object; nothing to undo

    def _write_here(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:  # noqa: ANN401
        """In the writer thread: one BEGIN IMMEDIATE … COMMIT (or ROLLBACK)."""
        conn = self._connection(self._write_engine)
        with conn.begin():
            return fn(conn, *args, **kwargs)

    async def read(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(self._read_here, fn, *args, **kwargs)
        async with _mapped(what):
            return await loop.run_in_executor(self._readers, call)

    async def write(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(self._write_here, fn, *args, **kwargs)
        async with _mapped(what):
            return await loop.run_in_executor(self._writer, call)

    write_unflushed = write  # one statement in the writer thread is as cheap as it gets

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for pool in (self._readers, self._writer):
            await loop.run_in_executor(None, functools.partial(pool.shutdown, wait=True))
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
        self._write_engine.dispose()
        self._read_engine.dispose()


def _writer_pragmas(dbapi_conn: Any, _record: Any) -> None:  # noqa: ANN401 - sqlite3
    dbapi_conn.isolation_level = None  # we say BEGIN ourselves (below), not the driver
    cursor = dbapi_conn.cursor()
    # WAL: readers never block the archiver; NORMAL is durable at each WAL checkpoint
    # and loses nothing on a process crash (only on power loss).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _reader_pragmas(dbapi_conn: Any, _record: Any) -> None:  # noqa: ANN401 - sqlite3
    dbapi_conn.isolation_level = None  # each SELECT its own snapshot, no transaction held
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.execute("PRAGMA mmap_size=268435456")  # 256 MiB: page reads without syscalls
    cursor.execute("PRAGMA cache_size=-16384")  # 16 MiB of page cache
    cursor.close()


def _begin_immediate(conn: Connection) -> None:
    # On the driver's connection: through ``exec_driver_sql`` this statement alone cost
    # a live stream's small batches ≈ 80 µs each.
    conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]


class PostgresDatabase:
    """PostgreSQL through asyncpg; several gateways may share one database."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.engine: AsyncEngine = create_async_engine(url, pool_size=pool_size, pool_pre_ping=True)
        self._unflushed: AsyncEngine | None = None

    async def read(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        async with _mapped(what), self.engine.connect() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    async def write(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        async with _mapped(what), self.engine.begin() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    # A nonce per signed request, on an engine of its own: one statement in autocommit,
    # without waiting for the WAL flush, on connections not pinged at checkout. Through
    # the main engine (ping, BEGIN, INSERT, COMMIT with its flush) the check took a median
    # ≈ 1 ms a request, p99 ≈ 10 ms on 2 shared cores; this way ≈ 0.4 ms, p99 ≈ 1 ms
    # (a bare asyncpg statement: 0.15 ms). A crash of PostgreSQL forgets at most the
    # last ≈ 0.6 s of nonces (three times wal_writer_delay): a request recorded just then
    # could be replayed once, inside its window.

    async def write_unflushed(
        self,
        what: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._unflushed is None:
            self._unflushed = create_async_engine(
                self.engine.url,
                pool_size=2,
                isolation_level="AUTOCOMMIT",
                pool_reset_on_return=None,  # autocommit: no transaction to end
                connect_args={"server_settings": {"synchronous_commit": "off"}},
            )
        async with _mapped(what), self._unflushed.connect() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    async def close(self) -> None:
        if self._unflushed is not None:
            await self._unflushed.dispose()
            self._unflushed = None
        await self.engine.dispose()
