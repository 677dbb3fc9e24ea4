"""``fieldchat device run``: one long-running process per state file that owns the
device (the state file, the link, the outbox) and serves its control socket.

    client ──line──▶ connection task ──▶ worker thread: Dispatcher.handle ──▶ reply
    Device worker ──event──▶ loop ──▶ each subscribed connection's bounded queue

The socket is a UNIX socket next to the state file (:func:`socket_path`, mode 0600:
only the owner connects) and, with ``tcp``, a loopback TCP port whose connections
must first present the token written (0600) to :func:`token_path`. The protocol is
JSON-RPC 2.0, one object per line (:mod:`fieldchat.device.rpc`), the methods those of
:mod:`fieldchat.device.control` (docs/device.md, Daemon and control socket).

Clients are untrusted even when local: a line is at most ``MAX_LINE`` bytes (a
longer one is answered -32600 and the connection closed), at most
``MAX_CONNECTIONS`` connections are served, each with at most ``MAX_QUEUED``
lines waiting to be written to it; a subscriber that falls that far behind is
disconnected (logged) rather than letting the daemon's memory grow. Its messages
stay stored: ``listen.take`` returns them when it comes back.

SIGTERM and SIGINT stop it cleanly: the servers close, the socket and token files go,
the device parks its steps, saves and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import socket
import stat
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fieldchat.device.client import Device
from fieldchat.device.control import NOTIFICATION, Caller, Control, event_json
from fieldchat.device.control_client import SUN_PATH_MAX, peer_uid, socket_path, token_path
from fieldchat.device.events import Event
from fieldchat.device.rpc import (
    INVALID_REQUEST,
    MAX_LINE,
    SERVER_ERROR,
    Dispatcher,
    RpcError,
    error_line,
    notification,
)
from fieldchat.schemas.errors import ConfigError
from fieldchat.schemas.signals import until_stopped

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_QUEUED",
    "Daemon",
    "parse_tcp",
    "run",
]

log = logging.getLogger("fieldchat.device.daemon")

MAX_CONNECTIONS = 32  # served at once per socket; one more is answered -32000 and closed
AUTH_TIMEOUT_S = 5.0  # a TCP connection that has not authenticated by then is closed
MAX_QUEUED = 1_000  # lines waiting to be written to one connection (replies, events)
SEND_TIMEOUT_S = 10.0  # a closing connection's queued lines must leave within this
WORKERS = 8  # threads running methods (some wait for the broker up to their timeout)


def parse_tcp(value: str) -> tuple[str, int]:
    """``HOST:PORT`` of a loopback address (``localhost``, 127.0.0.0/8, ``[::1]``).

    Raises:
        ConfigError: not HOST:PORT, or not a loopback address.
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--tcp {value!r}: use 127.0.0.1:PORT")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"--tcp {value!r}: only a loopback address (127.0.0.1, ::1) is served; "
            "the control socket sends and reads as this device"
        )
    return host, int(port)


class _Connection:
    """One client: its :class:`Caller` and the bounded queue of lines to write."""

    def __init__(self, caller: Caller, writer: asyncio.StreamWriter, max_queued: int) -> None:
        self.caller = caller
        self.writer = writer
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue(max_queued)
        self.overflowed = False

    def push(self, line: bytes) -> None:
        """Queue an event line; past ``MAX_QUEUED`` the connection is dropped."""
        if self.overflowed:
            return
        try:
            self.out.put_nowait(line)
        except asyncio.QueueFull:
            self.overflowed = True
            self.caller.subscribed = False
            log.warning("a subscriber fell %d lines behind: disconnected", self.out.maxsize)
            self.writer.transport.abort()  # its reader sees the end; nothing more is written

    def end(self) -> None:
        """Let the sender write what is queued, then stop."""
        with contextlib.suppress(asyncio.QueueFull):
            self.out.put_nowait(None)


class Daemon:
    """Serves ``device`` (started by :meth:`serve`, closed when it ends).

    Args:
        device: the device, not started.
        tcp: also listen on this loopback ``(host, port)`` (port 0: any free port).
        ready: called with the addresses served once they accept connections.
        max_queued: lines waiting for one connection before it is dropped.
    """

    def __init__(
        self,
        device: Device,
        *,
        tcp: tuple[str, int] | None = None,
        ready: Callable[[list[str]], None] | None = None,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.device = device
        self.max_queued = max_queued
        self.tcp = tcp
        self.ready = ready
        self.path = socket_path(device.state.path)
        self.token_file = token_path(device.state.path)
        self._control = Control(device)
        self._dispatcher = Dispatcher(self._control.methods())
        self._connections: set[_Connection] = set()
        self._counts = {"unix": 0, "tcp": 0}
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="fieldchat-rpc")
        self._token: str | None = None
        self._inode: int | None = None

    async def serve(self) -> None:
        """Start the device, serve until cancelled, then stop everything cleanly.

        Raises:
            ConfigError: the state file is in use, the socket path is taken or too long.
        """
        loop = asyncio.get_running_loop()

        def on_event(event: Event) -> None:  # on the device's worker thread
            loop.call_soon_threadsafe(self._broadcast, event)

        self.device.on_event = on_event
        servers: list[asyncio.Server] = []
        try:
            await loop.run_in_executor(self._pool, self.device.start)
            servers.append(await self._unix_server())
            served = [str(self.path)]
            if self.tcp is not None:
                self._token = secrets.token_urlsafe(32)
                _write_private(self.token_file, self._token + "\n")
                try:
                    server = await asyncio.start_server(
                        lambda r, w: self._client(r, w, token=self._token),
                        *self.tcp,
                        limit=MAX_LINE,
                    )
                except OSError as exc:
                    host, port = self.tcp
                    taken = exc.errno == errno.EADDRINUSE
                    why = "address already in use" if taken else exc.strerror or str(exc)
                    raise ConfigError(f"--tcp {host}:{port}: {why}") from exc
                servers.append(server)
                host, port = server.sockets[0].getsockname()[:2]
                served.append(f"tcp {host}:{port}")
            if self.ready is not None:
                self.ready(served)
            await asyncio.Event().wait()  # until cancelled (a stop signal)
        finally:
            for server in servers:
                server.close()
            for conn in list(self._connections):
                conn.writer.close()
            self._remove_files()
            # Methods that wait (drain, bundles) look at this between slices of their
            # timeout: every running one ends within a second, then the device closes.
            self._control.stopping = True
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
            await asyncio.to_thread(self.device.close)

    async def _unix_server(self) -> asyncio.Server:
        path = self.path
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ConfigError(
                f"the control socket path {path} is longer than {SUN_PATH_MAX} bytes: "
                "move the state file to a shorter path"
            )
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"{path} exists and is not a socket: move it away")
            # The state file's lock (Device.start) is ours: a socket left there is
            # from a daemon that was killed.
            try:
                path.unlink()
            except PermissionError:
                raise ConfigError(f"{path} belongs to someone else: remove it") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no moment where others may connect
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot create the control socket {path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._inode = path.stat().st_ino
        return await asyncio.start_unix_server(
            lambda r, w: self._client(r, w, token=None), sock=sock, limit=MAX_LINE
        )

    def _remove_files(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        if self._token is not None:
            self.token_file.unlink(missing_ok=True)

    # -- connections ------------------------------------------------------------------

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, token: str | None
    ) -> None:
        kind = "unix" if token is None else "tcp"
        refusal = self._refusal(kind, writer)
        if refusal is not None:
            log.warning("refused a %s connection: %s", kind, refusal)
            with contextlib.suppress(OSError):
                writer.write(error_line(RpcError(SERVER_ERROR, refusal)))
                await writer.drain()
            await _close(reader, writer)
            return
        conn = _Connection(Caller(token=token), writer, self.max_queued)
        self._connections.add(conn)
        self._counts[kind] += 1
        sender = asyncio.create_task(self._send(conn, writer))
        try:
            await self._read(conn, reader)
        except (ConnectionError, OSError):
            pass
        except Exception:  # an entry point: log, and keep serving the others
            log.exception("a control connection failed")
        finally:
            self._counts[kind] -= 1
            self._connections.discard(conn)
            conn.caller.subscribed = False
            conn.end()
            if conn.overflowed:
                sender.cancel()
            # What is queued gets SEND_TIMEOUT_S to leave: a client that stopped
            # reading does not keep this task (and its lines) forever.
            with contextlib.suppress(
                TimeoutError, asyncio.CancelledError, ConnectionError, OSError
            ):
                await asyncio.wait_for(sender, SEND_TIMEOUT_S)
            if conn.overflowed:
                writer.close()  # aborted already
            else:
                await _close(reader, writer)

    def _refusal(self, kind: str, writer: asyncio.StreamWriter) -> str | None:
        """Why a new connection is not served, or ``None``."""
        if self._counts[kind] >= MAX_CONNECTIONS:
            return f"too many connections (at most {MAX_CONNECTIONS})"
        if kind == "unix":
            # The socket's mode lets only its owner in; the peer's uid says so again,
            # should the mode have been changed (root may always connect).
            uid = _peer_uid(writer)
            if uid is not None and uid not in (os.getuid(), 0):
                return "not the daemon's user"
        return None

    async def _read(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while not conn.overflowed and not conn.caller.closing:
            try:
                if conn.caller.authorized:
                    line = await reader.readline()
                else:  # TCP: anyone on this machine may connect; auth comes first, soon
                    line = await asyncio.wait_for(reader.readline(), AUTH_TIMEOUT_S)
            except TimeoutError:
                error = RpcError(SERVER_ERROR, "unauthorized: no auth in time")
                await conn.out.put(error_line(error))
                return
            except ValueError:  # asyncio's LimitOverrunError: no newline within the limit
                error = RpcError(INVALID_REQUEST, f"line longer than {MAX_LINE} bytes")
                await conn.out.put(error_line(error))
                return
            if not line:
                return  # the client closed
            if not line.strip():
                continue
            try:
                reply = await loop.run_in_executor(
                    self._pool, self._dispatcher.handle, line, conn.caller
                )
            except RuntimeError:  # the pool shut down: the daemon is stopping
                return
            if reply is not None:
                await conn.out.put(reply)

    async def _send(self, conn: _Connection, writer: asyncio.StreamWriter) -> None:
        while (line := await conn.out.get()) is not None and not conn.overflowed:
            writer.write(line)
            await writer.drain()

    def _broadcast(self, event: Event) -> None:
        """On the loop: one event to every subscriber that wants it."""
        body = event_json(event)
        line = notification(NOTIFICATION, body)
        for conn in list(self._connections):
            if conn.caller.wants(body):
                conn.push(line)


def run(open_device: Callable[[], Device], *, tcp: str | None = None) -> None:
    """``fieldchat device run``: serve the device ``open_device`` opens until SIGTERM or
    SIGINT; one line on stdout when serving, one on stderr when stopped.

    Raises:
        ConfigError: a bad ``--tcp``, the state file in use, the socket path taken.
    """
    address = parse_tcp(tcp) if tcp is not None else None
    device = open_device()

    def ready(served: list[str]) -> None:
        sys.stdout.write(f"fieldchat device run: serving {', '.join(served)}\n")
        sys.stdout.flush()

    daemon = Daemon(device, tcp=address, ready=ready)
    try:
        asyncio.run(until_stopped(daemon.serve()))
    except KeyboardInterrupt:  # a signal before until_stopped took them over
        device.close()
    sys.stderr.write("fieldchat device run stopped.\n")


LINGER_S = 1.0  # how long a closing connection's unread input is drained


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after the client can read what was written: end our side, then drain what
    it sent for up to :data:`LINGER_S`. Closing a socket with unread input makes the
    kernel reset the connection, and the client may lose our last line (the error
    that says why) before reading it."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass
    except (TimeoutError, ValueError, ConnectionError, OSError):
        pass
    writer.close()


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    return None if sock is None else peer_uid(sock)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` created 0600 (replacing an old file)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
