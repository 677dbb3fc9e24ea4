"""JSON-RPC 2.0 over newline-delimited JSON, without I/O: one line in, one line out.

The device daemon (:mod:`fieldchat.device.daemon`) reads a line from a client and
hands it to :meth:`Dispatcher.handle`, which parses it (a request or a batch),
checks each request against the method table (names and parameter types), calls the
handlers and returns the response line (``None`` when the line held only
notifications). Nothing here touches a socket, so every malformed input is tested
without one, and nothing a client sends raises out of :meth:`Dispatcher.handle`.

Error codes (JSON-RPC 2.0 §5.1, and ours for the application, docs/device.md):

    -32700  parse error: not JSON (or not UTF-8)
    -32600  invalid request: not a request object, an empty or too large batch
    -32601  method not found
    -32602  invalid params: missing, unknown or mistyped parameters
    -32603  internal error: a bug, logged; the daemon keeps serving
    -32000  unauthorized (a TCP connection without its token), overloaded
    1000+   a :class:`~fieldchat.schemas.errors.FieldchatError`: ``data`` carries its
            ``reason`` and ``kind`` (see :data:`APP_CODES`)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from fieldchat.schemas.errors import (
    ConfigError,
    FieldchatError,
    IdempotencyConflict,
    KeyStoreError,
    ProtocolError,
    TransportError,
    WireError,
)

__all__ = [
    "APP_CODES",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_BATCH",
    "MAX_LINE",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SERVER_ERROR",
    "Dispatcher",
    "Method",
    "Param",
    "RpcError",
    "error_line",
    "notification",
    "openrpc",
]

log = logging.getLogger("fieldchat.device.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000

# A line holds one request or a batch: a text (16,384 characters, each at most 12
# bytes as JSON escapes) fits many times over; a longer line is refused unread.
MAX_LINE = 256 * 1024
MAX_BATCH = 64  # requests in one batch

# FieldchatError kinds to application codes, most specific first. ``kind`` tells a
# client how to exit (the CLI: config 2, transport 3, the rest 1).
APP_CODES: tuple[tuple[type[FieldchatError], int, str], ...] = (
    (ConfigError, 1001, "config"),
    (TransportError, 1002, "transport"),
    (ProtocolError, 1003, "protocol"),
    (KeyStoreError, 1004, "state"),
    (WireError, 1005, "limit"),
    (IdempotencyConflict, 1006, "conflict"),
    (FieldchatError, 1000, "error"),
)

Kind = Literal["string", "integer", "number", "boolean", "string[]", "integer[]", "object"]


class RpcError(Exception):
    """An error response: a JSON-RPC ``code``, a one-line ``message``, optional ``data``."""

    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = dict(data) if data is not None else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def of(cls, exc: FieldchatError) -> RpcError:
        """The application error for ``exc`` (its code, message, reason and kind)."""
        for klass, code, kind in APP_CODES:
            if isinstance(exc, klass):
                return cls(code, str(exc), {"reason": exc.reason, "kind": kind})
        raise AssertionError("FieldchatError is in APP_CODES")  # pragma: no cover


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no 1


_KIND_CHECKS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": _integer,
    "number": lambda v: _integer(v) or isinstance(v, float),
    "boolean": lambda v: isinstance(v, bool),
    "string[]": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "integer[]": lambda v: isinstance(v, list) and all(map(_integer, v)),
    "object": lambda v: isinstance(v, dict),
}


@dataclass(frozen=True, slots=True)
class Param:
    """A named parameter: its JSON type, whether required, bounds, and its doc line."""

    name: str
    kind: Kind
    doc: str
    required: bool = True
    max_length: int | None = None  # strings: characters; lists: items
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: object) -> None:
        """Raises:
        RpcError: ``value`` is not of this parameter's type or out of bounds."""
        if not _KIND_CHECKS[self.kind](value):
            raise RpcError(INVALID_PARAMS, f"parameter {self.name!r} must be {self.kind}")
        if not all(map(_utf8, value if isinstance(value, list) else [value])):
            raise RpcError(INVALID_PARAMS, f"parameter {self.name!r} is not valid Unicode")
        if self.max_length is not None and len(value) > self.max_length:  # type: ignore[arg-type]
            raise RpcError(INVALID_PARAMS, f"parameter {self.name!r} is too long")
        if self.minimum is not None and value < self.minimum:  # type: ignore[operator]
            raise RpcError(INVALID_PARAMS, f"parameter {self.name!r} is below {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:  # type: ignore[operator]
            raise RpcError(INVALID_PARAMS, f"parameter {self.name!r} is above {self.maximum:g}")

    def schema(self) -> dict[str, Any]:
        """Its JSON Schema (for the OpenRPC document)."""
        array = self.kind.endswith("[]")
        out: dict[str, Any] = (
            {"type": "array", "items": {"type": self.kind[:-2]}} if array else {"type": self.kind}
        )
        if self.max_length is not None:
            out["maxItems" if array else "maxLength"] = self.max_length
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


def _utf8(value: object) -> bool:
    """Whether ``value`` is no string or one UTF-8 can encode (JSON allows lone
    surrogates, ``"\\ud800"``; nothing downstream could store or seal them)."""
    if not isinstance(value, str):
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


C = TypeVar("C")  # what a handler gets besides its params: the caller's connection


@dataclass(frozen=True, slots=True)
class Method(Generic[C]):
    """A method: its name, parameters, handler, and what it returns (a JSON Schema).
    The handler takes the checked params (absent optional ones left out) and the
    connection's context; a :class:`FieldchatError` it raises becomes an application
    error, an :class:`RpcError` is returned as it is."""

    name: str
    summary: str
    params: tuple[Param, ...]
    handler: Callable[[dict[str, Any], C], object]
    result: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, params: object) -> dict[str, Any]:
        """The params (by name or by position) checked against the table.

        Raises:
            RpcError: missing, unknown or mistyped parameters.
        """
        if params is None:
            params = {}
        if isinstance(params, list):
            if len(params) > len(self.params):
                raise RpcError(INVALID_PARAMS, f"{self.name} takes {len(self.params)} params")
            params = {p.name: v for p, v in zip(self.params, params, strict=False)}
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object or an array")
        known = {p.name for p in self.params}
        unknown = sorted(k for k in params if k not in known)
        if unknown:
            raise RpcError(INVALID_PARAMS, f"unknown parameter {unknown[0]!r} for {self.name}")
        for param in self.params:
            if param.name in params:
                param.check(params[param.name])
            elif param.required:
                raise RpcError(INVALID_PARAMS, f"missing parameter {param.name!r}")
        return params


def notification(method: str, params: Mapping[str, Any]) -> bytes:
    """A notification line (no ``id``: the daemon's events to a subscriber)."""
    return _dump({"jsonrpc": "2.0", "method": method, "params": params})


def error_line(error: RpcError, request_id: object = None) -> bytes:
    """One error response line."""
    return _dump({"jsonrpc": "2.0", "id": request_id, "error": error.to_json()})


def _not_json(constant: str) -> None:
    """Python's JSON reads NaN and Infinity; JSON has no such numbers (a NaN timeout
    would never end a wait)."""
    raise ValueError(f"{constant} is not JSON")


def _text(obj: object) -> str:
    # ASCII: a lone surrogate (valid in a JSON string, not in UTF-8) stays escaped.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _dump(obj: object) -> bytes:
    return f"{_text(obj)}\n".encode()


def _valid_id(value: object) -> bool:
    # JSON-RPC 2.0 §4: a string, a number or null (numbers without fractions, SHOULD).
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


class Dispatcher(Generic[C]):
    """Parses request lines, checks them against ``methods`` and calls the handlers.

    Every outcome is a response (or nothing, for notifications): a bug in a handler
    is logged and answered -32603, so one bad request never stops the daemon.
    """

    def __init__(self, methods: Sequence[Method[C]]) -> None:
        self.methods = {m.name: m for m in methods}
        if len(self.methods) != len(methods):
            raise ValueError("two methods of the same name")

    def handle(self, line: bytes, context: C) -> bytes | None:
        """The response line to one request line (a request or a batch)."""
        try:
            message = json.loads(line, parse_constant=_not_json)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return error_line(RpcError(PARSE_ERROR, "parse error: not a JSON line"))
        if isinstance(message, list):
            if not message:
                return error_line(RpcError(INVALID_REQUEST, "empty batch"))
            if len(message) > MAX_BATCH:
                return error_line(RpcError(INVALID_REQUEST, f"batch above {MAX_BATCH} requests"))
            replies = [r for r in (self._one(m, context) for m in message) if r is not None]
            return f"[{','.join(replies)}]\n".encode() if replies else None
        reply = self._one(message, context)
        return None if reply is None else f"{reply}\n".encode()

    def _one(self, request: object, context: C) -> str | None:
        """One request's reply as JSON text, or ``None`` for a notification."""
        reply = self._reply(request, context)
        if reply is None:
            return None
        try:
            return _text(reply)
        except (TypeError, ValueError):
            log.exception("a result that is not JSON: %.200r", reply)
            error = RpcError(INTERNAL_ERROR, "internal error: a result that is not JSON (logged)")
            return _text({"jsonrpc": "2.0", "id": reply.get("id"), **_err(error)})

    def _reply(self, request: object, context: C) -> dict[str, Any] | None:
        if (
            not isinstance(request, dict)
            or request.get("jsonrpc") != "2.0"
            or not isinstance(request.get("method"), str)
            or ("id" in request and not _valid_id(request["id"]))
        ):
            rid = request.get("id") if isinstance(request, dict) else None
            error = RpcError(INVALID_REQUEST, "invalid request: not a JSON-RPC 2.0 request")
            return {"jsonrpc": "2.0", "id": rid if _valid_id(rid) else None, **_err(error)}
        is_call = "id" in request
        rid = request.get("id")
        try:
            result = self.call(request["method"], request.get("params"), context)
        except RpcError as exc:
            outcome = _err(exc)
        else:
            outcome = {"result": result}
        if not is_call:
            return None  # a notification gets no answer, not even an error (§4.1)
        return {"jsonrpc": "2.0", "id": rid, **outcome}

    def call(self, name: str, params: object, context: C) -> object:
        """Call method ``name``: its result.

        Raises:
            RpcError: every failure, as the error to answer.
        """
        method = self.methods.get(name)
        if method is None:
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {name[:80]}")
        bound = method.bind(params)
        try:
            return method.handler(bound, context)
        except RpcError:
            raise
        except FieldchatError as exc:
            raise RpcError.of(exc) from None
        except Exception:
            log.exception("method %s failed", name)
            raise RpcError(INTERNAL_ERROR, f"internal error in {name} (logged)") from None


def _err(error: RpcError) -> dict[str, Any]:
    return {"error": error.to_json()}


def openrpc(
    title: str, version: str, methods: Sequence[Method[Any]], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The OpenRPC 1.2 document of ``methods`` (docs/device-rpc.openrpc.json is this,
    for the daemon's table; a test keeps them equal). ``extra``: ``x-`` members."""
    return {
        "openrpc": "1.2.6",
        "info": {"title": title, "version": version},
        "methods": [
            {
                "name": m.name,
                "summary": m.summary,
                "paramStructure": "either",
                "params": [
                    {
                        "name": p.name,
                        "summary": p.doc,
                        "required": p.required,
                        "schema": p.schema(),
                    }
                    for p in m.params
                ],
                "result": {"name": "result", "schema": dict(m.result)},
            }
            for m in sorted(methods, key=lambda m: m.name)
        ],
        **extra,
    }
