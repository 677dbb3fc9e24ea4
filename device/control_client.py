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


class ControlClient:
    """One connection to a daemon. Not thread-safe; use one per thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._events: deque[dict[str, Any]] = deque()
        self._ids = itertools.count(1)

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 2.0) -> ControlClient | None:
        """Connect to the daemon at ``path``; ``None`` when none answers there (no
        socket, or one left by a daemon that was killed)."""
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
        sock.settimeout(None)
        return cls(sock)

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
        self._sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        while True:
            message = self._next(None)
            if message is None:  # pragma: no cover - no timeout given
                continue
            if "method" in message:
                self._events.append(message.get("params") or {})
                continue
            if message.get("id") != rid and message.get("id") is not None:
                continue  # not ours (cannot happen: one call at a time)
            error = message.get("error")
            if error is not None:
                raise DaemonError(
                    int(error.get("code", 0)), str(error.get("message")), error.get("data")
                )
            return message.get("result")

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
        while b"\n" not in self._buffer:
            if timeout is not None and not select.select([self._sock], [], [], timeout)[0]:
                return None
            chunk = self._sock.recv(65536)
            if not chunk:
                raise DaemonGone("the daemon closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise DaemonGone("the daemon sent a line longer than the client reads")
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        return message if isinstance(message, dict) else {"result": message}
