"""A client of the device daemon's control socket (``fieldchat device run``), on the
standard library only: the CLI imports this first, and when a daemon answers, a
command runs without loading the engine, cryptography, pydantic or paho.

    client = ControlClient.connect(socket_path(state))   # None: no daemon running
    client.call("send", {"cid": cid, "text": "hi", "idempotency_key": key})
    client.call("subscribe"); client.next_event(timeout=1.0)

Requests are answered in order on a connection; notifications (``event``) may come
between, and are queued for :meth:`ControlClient.next_event`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import socket
import struct
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_STATE",
    "MAX_LINE",
    "SUN_PATH_MAX",
    "ControlClient",
    "DaemonError",
    "DaemonGone",
    "NotOurDaemon",
    "daemon_of",
    "peer_uid",
    "socket_path",
    "state_file",
    "token_path",
]

# The device's defaults (fieldchat.device.config reads these, with pydantic).
DEFAULT_STATE = Path("~/.local/share/fieldchat/device.sqlite3")
DEFAULT_CONFIG = Path("~/.config/fieldchat/device.toml")
SUN_PATH_MAX = 107  # bytes of a UNIX socket path (Linux sun_path, less the NUL)
MAX_LINE = 16 * 1024 * 1024  # a reply of 1,000 rows of the longest texts fits


def socket_path(state: str | os.PathLike[str]) -> Path:
    """The control socket of a state file: ``<state>.sock`` beside it."""
    path = Path(state).expanduser()
    return path.with_name(path.name + ".sock")


def token_path(state: str | os.PathLike[str]) -> Path:
    """Where the daemon writes the token of its TCP socket: ``<state>.token`` (0600)."""
    path = Path(state).expanduser()
    return path.with_name(path.name + ".token")


def state_file(flag: str | os.PathLike[str] | None, config: Path | None) -> Path:
    """The state file a device command uses, found as
    :class:`~fieldchat.device.config.DeviceSettings` finds it (flag or FIELDCHAT_STATE,
    then the TOML file's ``state``, then the default) without importing pydantic. A
    TOML file that does not parse is left to the full settings to report."""
    if flag is not None:
        return Path(flag).expanduser()
    toml = (config or DEFAULT_CONFIG).expanduser()
    with contextlib.suppress(OSError, ValueError):
        import tomllib  # noqa: PLC0415 - only when a config file names the state

        value = tomllib.loads(toml.read_text()).get("state")
        if isinstance(value, str):
            return Path(value).expanduser()
    return DEFAULT_STATE.expanduser()


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a UNIX socket's peer (SO_PEERCRED, Linux), or ``None`` elsewhere."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, 12))
    return int(uid)


class DaemonError(Exception):
    """An error the daemon answered: JSON-RPC ``code``, ``message``, and ``data``
    (for device errors: ``reason`` and ``kind``: config, transport, protocol, ...)."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data or {}

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", "error"))


class DaemonGone(ConnectionError):
    """The daemon closed the connection (it stopped) before answering."""


class NotOurDaemon(ConnectionError):
    """What answers on the socket runs as another user than the state file's owner:
    not the daemon of this state file (a program listening in its place)."""


class ControlClient:
    """One connection to a daemon. Not thread-safe; use one per thread."""

    def __init__(
        self, sock: socket.socket, path: Path | None = None, owner: int | None = None
    ) -> None:
        self.path = path  # the UNIX socket (None over TCP): where to connect again
        self.owner = owner  # the uid the daemon must run as (connect's check)
        self._sock = sock
        self._buffer = bytearray()
        self._events: deque[dict[str, Any]] = deque()
        self._ids = itertools.count(1)

    @classmethod
    def connect(
        cls, path: str | os.PathLike[str], *, owner: int | None = None, timeout: float = 2.0
    ) -> ControlClient | None:
        """Connect to the daemon at ``path``; ``None`` when none answers there (no
        socket, or one left by a daemon that was killed).

        Raises:
            NotOurDaemon: ``owner`` is given and the peer runs as another uid (Linux
                SO_PEERCRED): in a directory others may write, someone else's program
                could listen there and read what we send.
        """
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            return None  # no daemon can listen there (it refuses such a path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            return None
        except OSError:
            sock.close()
            raise
        uid = peer_uid(sock)
        if owner is not None and uid is not None and uid != owner:
            sock.close()
            raise NotOurDaemon(
                f"{path} is served by uid {uid}, not by the state file's owner (uid {owner})"
            )
        sock.settimeout(None)
        return cls(sock, Path(path), owner)

    @classmethod
    def connect_tcp(
        cls, host: str, port: int, token: str, *, timeout: float = 5.0
    ) -> ControlClient:
        """Connect to a daemon's TCP socket and present its token.

        Raises:
            DaemonError: the token was refused.
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        client = cls(sock)
        try:
            client.call("auth", {"token": token})
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN401 - JSON, shaped by the method
        """Call ``method``; its result (events that arrive meanwhile are queued).

        Raises:
            DaemonError: the daemon answered an error.
            DaemonGone: the connection ended first.
        """
        rid = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params:
            request["params"] = params
        message = self._exchange(request)
        self._raise(message)
        return message.get("result")

    def call_many(self, method: str, params: list[dict[str, Any]]) -> list[Any]:
        """Call ``method`` once per params, as one batch (one round trip); the results
        in order. The daemon runs every call of a batch.

        Raises:
            DaemonError: the first error the daemon answered (the others ran).
            DaemonGone: the connection ended first.
        """
        ids = [next(self._ids) for _ in params]
        batch = [
            {"jsonrpc": "2.0", "id": rid, "method": method, "params": p}
            for rid, p in zip(ids, params, strict=True)
        ]
        message = self._exchange(batch)
        replies = message.get("batch")
        if replies is None:  # one error for the whole batch
            self._raise(message)
            return []  # pragma: no cover - a batch is answered by a list or an error
        by_id = {r.get("id"): r for r in replies if isinstance(r, dict)}
        for rid in ids:
            self._raise(by_id.get(rid, {"error": {"message": "no reply to a call"}}))
        return [by_id[rid].get("result") for rid in ids]

    def _exchange(self, request: object) -> dict[str, Any]:
        """Send one request line; the reply (notifications before it are queued).
        Replies come in request order and one request is out at a time."""
        self._sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        while True:
            message = self._next(None)
            if message is None:  # pragma: no cover - no timeout given
                continue
            if "method" not in message:
                return message
            self._events.append(message.get("params") or {})

    @staticmethod
    def _raise(message: dict[str, Any]) -> None:
        error = message.get("error")
        if error is not None:
            data = error.get("data")
            raise DaemonError(int(error.get("code", 0)), str(error.get("message")), data)

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        """The next ``event`` notification's params, or ``None`` after ``timeout``.

        Raises:
            DaemonGone: the connection ended.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            left = None if end is None else max(0.0, end - time.monotonic())
            message = self._next(left)
            if message is None:
                return None
            if "method" in message:
                self._events.append(message.get("params") or {})
        return self._events.popleft()

    @property
    def pending(self) -> bool:
        """Whether events or bytes are already buffered (select() would not say so)."""
        return bool(self._events) or b"\n" in self._buffer

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message, or ``None`` after ``timeout``.

        Raises:
            DaemonGone: the connection ended.
        """
        scanned = 0  # bytes of the buffer known to hold no newline
        while (end := self._buffer.find(b"\n", scanned)) < 0:
            scanned = len(self._buffer)
            if timeout is not None and not select.select([self._sock], [], [], timeout)[0]:
                return None
            chunk = self._sock.recv(65536)
            if not chunk:
                raise DaemonGone("the daemon closed the connection")
            self._buffer += chunk  # a bytearray: appending does not copy what is there
            if len(self._buffer) > MAX_LINE:
                raise DaemonGone("the daemon sent a line longer than the client reads")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        message = json.loads(line)
        return message if isinstance(message, dict) else {"batch": message}


def daemon_of(state: Path) -> ControlClient | None:
    """A connection to the daemon serving the state file ``state``, or ``None`` (no
    state file, no daemon answering, or ``FIELDCHAT_NO_DAEMON=1``): only one running as
    the state file's owner counts. What the CLI (:mod:`fieldchat.device.remote`) and its
    typer-free path (``fieldchat._fast``) both connect with.

    Raises:
        NotOurDaemon: another user's program answers there (nothing was sent).
        OSError: the socket may not be used (``PermissionError``) or is broken.
    """
    if os.environ.get("FIELDCHAT_NO_DAEMON") == "1":
        return None
    try:
        owner = state.stat().st_uid
    except OSError:
        return None  # no state file, no daemon of it
    return ControlClient.connect(socket_path(state), owner=owner)
