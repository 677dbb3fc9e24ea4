"""The device daemon's methods: the JSON-RPC method table over one running
:class:`~fieldchat.device.client.Device`, and the one mapping of its events to JSON.

:meth:`Control.methods` builds the table :class:`~fieldchat.device.rpc.Dispatcher` serves (and
docs/device-rpc.openrpc.json describes; a test keeps the two equal). Each handler
gets the checked params and the caller's :class:`Caller` (its subscription, whether
it authenticated). Handlers run on the daemon's worker threads, never on its event
loop: some wait (fetching a member's bundle, draining the outbox).

"Accepted" means durable: ``send`` answers once the message is committed to the
outbox (with ``--power-safe``, fsynced), so a daemon killed right after its answer
still delivers it when it runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldchat.device.client import Device
from fieldchat.device.config import low_bandwidth_policy
from fieldchat.device.events import (
    Connected,
    Disconnected,
    Event,
    ForgeryDetected,
    GapDetected,
    Joined,
    KeyChanged,
    MessageReceived,
    MessageVerified,
    PresenceChanged,
    PublishRefused,
    ReceiptReceived,
    Removed,
)
from fieldchat.device.idempotency import MAX_KEY_LENGTH
from fieldchat.device.rows import ReceivedRow
from fieldchat.device.rpc import APP_CODES, SERVER_ERROR, Method, Param, RpcError, openrpc
from fieldchat.schemas import Policy
from fieldchat.schemas.errors import ConfigError, UnknownParticipant
from fieldchat.schemas.messages import MAX_TEXT_BYTES
from fieldchat.schemas.roster import MAX_SIGN_EVERY

__all__ = [
    "EVENTS",
    "LISTEN_CURSOR",
    "MAX_TIMEOUT_S",
    "NOTIFICATION",
    "Caller",
    "Control",
    "document",
    "event_json",
]

LISTEN_CURSOR = "listen_cursor"  # meta key shared with the standalone ``listen``
MAX_TIMEOUT_S = 120.0  # the longest a method waits (bundles, the outbox)
MAX_ROWS = 1_000  # messages returned by one call
MAX_REPLY_CHARS = 1_000_000  # text in one reply of messages (≤ 6 MB as JSON escapes)
WAIT_SLICE_S = 0.5  # a waiting method checks whether the daemon stops this often
NOTIFICATION = "event"  # the method name of every notification
# What a subscription streams: every event type of the device (docs/device.md, Events).
EVENTS = (
    MessageReceived,
    MessageVerified,
    ForgeryDetected,
    ReceiptReceived,
    KeyChanged,
    Joined,
    Removed,
    GapDetected,
    PublishRefused,
    Connected,
    Disconnected,
    PresenceChanged,
)


@dataclass
class Caller:
    """One connection as the methods see it. ``token``: what a TCP connection must
    present with ``auth`` before anything else (``None``: the UNIX socket, whose
    0600 mode is the check)."""

    token: str | None = None
    authorized: bool = False
    subscribed: bool = False
    cids: frozenset[str] | None = None  # the subscription's filter (None: all)
    closing: bool = field(default=False)  # a failed auth: the daemon closes the connection

    def __post_init__(self) -> None:
        if self.token is None:
            self.authorized = True

    def wants(self, event: dict[str, Any]) -> bool:
        """Whether this caller's subscription covers ``event`` (its JSON form)."""
        if not self.subscribed:
            return False
        cid = event.get("cid")
        return self.cids is None or cid is None or cid in self.cids


def event_json(event: Event) -> dict[str, Any]:
    """The JSON of a device event: the same object ``listen --json`` prints."""
    return {**event.to_json(), "type": str(event.type)}


_CID = Param("cid", "string", "The conversation id.", max_length=64)
_PIDS = Param("pids", "string[]", "Participant ids.", max_length=256)
_TIMEOUT = Param(
    "timeout",
    "number",
    "Seconds to wait for the broker (bundles, the outbox); default 10, at most 120.",
    required=False,
    minimum=0,
)
_ROWS = {"type": "array", "items": {"type": "object"}}
_EMPTY: dict[str, Any] = {"type": "object"}


def _bounded(rows: list[ReceivedRow]) -> list[ReceivedRow]:
    """The first rows whose texts add up to at most :data:`MAX_REPLY_CHARS` (at least
    one): a reply stays a few megabytes, however long the texts."""
    total = 0
    for i, row in enumerate(rows):
        total += len(row.text or "")
        if total > MAX_REPLY_CHARS and i:
            return rows[:i]
    return rows


def _timeout(params: dict[str, Any]) -> float:
    return min(float(params.get("timeout", 10.0)), MAX_TIMEOUT_S)


class Control:
    """The method handlers over ``device`` (started by the daemon)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.stopping = False  # set by the daemon: waiting methods end within a slice
        self._cursor_lock = threading.Lock()

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` holds, in slices of :data:`WAIT_SLICE_S`, so a
        daemon that stops is never held by a long timeout; whether it holds."""
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0 or self.stopping:
                return False
            self.device.wait_for(done, min(left, WAIT_SLICE_S))
        return True

    def _fetch(self, pids: Sequence[str], timeout: float) -> None:
        """Learn the bundles of ``pids`` first, in slices (the device's own fetch
        then finds them).

        Raises:
            UnknownParticipant: one did not arrive in time.
        """
        engine = self.device.engine
        with contextlib.suppress(UnknownParticipant):
            self.device.fetch_bundles(pids, 0.0)  # asks for them (subscribes)
        if self._wait(lambda: all(engine.bundle_of(p) for p in pids), timeout):
            return
        absent = next(p for p in pids if engine.bundle_of(p) is None)
        raise UnknownParticipant(
            f"no bundle for {absent} within {timeout:g} s: has that device "
            f"connected to this broker once?"
        )

    # -- authentication and subscriptions ---------------------------------------------

    def auth(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        if caller.token is not None and not hmac.compare_digest(
            str(params["token"]).encode(), caller.token.encode()
        ):
            caller.closing = True
            raise RpcError(SERVER_ERROR, "unauthorized: wrong token", {"reason": "unauthorized"})
        caller.authorized = True
        return {"authorized": True}

    def subscribe(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        cids = params.get("cids")
        caller.cids = None if cids is None else frozenset(cids)
        caller.subscribed = True
        return self._link()

    def unsubscribe(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        caller.subscribed = False
        return {"subscribed": False}

    # -- identity ---------------------------------------------------------------------

    def whoami(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        d = self.device
        return {"pid": d.pid, "fingerprint": d.fingerprint(), "state": str(d.state.path)}

    def _link(self) -> dict[str, Any]:
        return {"connected": self.device.connected, "protocol": self.device.protocol}

    def presence(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        return {"presence": self.device.presence()}

    def status(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        return {**self._link(), "outbox": self.device.state.outbox_count()}

    def verify(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        pid, fingerprint = params["pid"], params.get("fingerprint")
        self._fetch([pid], _timeout(params))
        known = self.device.fingerprint(pid)
        ok = self.device.verify(pid, fingerprint) if fingerprint else None
        return {"pid": pid, "fingerprint": known, "verified": ok}

    # -- sending ----------------------------------------------------------------------

    def send(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        sent = self.device.send(
            params["cid"], params["text"], idempotency_key=params.get("idempotency_key")
        )
        return {
            "id": sent.id,
            "cid": sent.cid,
            "epoch": sent.epoch,
            "chain": sent.chain,
            "step": sent.step,
            "replayed": sent.replayed,
        }

    def drain(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        drained = self._wait(lambda: not self.device.state.outbox_count(), _timeout(params))
        return {"drained": drained, "outbox": self.device.state.outbox_count()}

    def delivery(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        """Wait until the broker acknowledged the ``ids`` (``send`` results) and, with
        ``acks``, that many members receipted each; where they are at the end."""
        ids, acks = list(dict.fromkeys(params["ids"])), params.get("acks", 0)
        state = self.device.state
        known = {row.id for row in state.sent_rows(ids)}
        if len(known) != len(ids):
            missing = next(i for i in ids if i not in known)
            raise ConfigError(f"no message {missing} was sent from this device")
        progress = {"published": 0, "acknowledged": 0}

        def done() -> bool:
            rows = state.sent_rows(ids)
            published = [row for row in rows if row.published_at is not None]
            progress["published"] = len(published)
            progress["acknowledged"] = sum(
                len(state.receipted_by(r.cid, r.epoch, r.chain, r.step)) >= acks for r in published
            )
            return progress["acknowledged"] == len(ids)

        delivered = self._wait(done, _timeout(params))
        return {"delivered": delivered, **progress, "messages": len(ids)}

    def outbox(self, params: dict[str, Any], caller: Caller) -> list[dict[str, Any]]:  # noqa: ARG002
        return [
            {
                "seq": row.seq,
                "what": str(row.what),
                "cid": row.cid,
                "topic": row.topic,
                "bytes": len(row.payload),
                "queued_at": row.created_at,
            }
            for row in self.device.state.outbox_from(0, MAX_ROWS)
        ]

    # -- conversations ----------------------------------------------------------------

    def conversations(self, params: dict[str, Any], caller: Caller) -> list[dict[str, Any]]:  # noqa: ARG002
        return [
            {
                "cid": info.cid,
                "epoch": info.epoch,
                "members": list(info.members),
                "admins": list(info.admins),
                "member": info.member,
            }
            for info in self.device.conversations()
        ]

    def members(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        engine = self.device.engine
        roster = engine.roster(params["cid"])
        out = []
        for member in roster.members:
            bundle = engine.bundle_of(member.pid)
            out.append(
                {
                    "pid": member.pid,
                    "admin": member.admin,
                    "fingerprint": self.device.fingerprint(member.pid) if bundle else None,
                    "verified": engine.is_verified(member.pid),
                }
            )
        return {"cid": params["cid"], "epoch": roster.epoch, "members": out}

    def create(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        if params.get("low_bandwidth"):
            policy = low_bandwidth_policy()
        else:
            policy = Policy(
                compress=params.get("compress", False), sign_every=params.get("sign_every", 1)
            )
        # Post-quantum members only unless told otherwise (PROTOCOL.md §5.2).
        policy = policy.model_copy(update={"require_pq": params.get("require_pq", True)})
        members = params.get("members", [])
        self._fetch(members, _timeout(params))
        cid = self.device.create_conversation(members, policy=policy, timeout=0.0)
        return {"cid": cid}

    def invite(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        self.device.engine.roster(params["cid"])  # an unknown conversation says so first
        self._fetch(params["pids"], _timeout(params))
        self.device.invite(params["cid"], params["pids"], timeout=0.0)
        return {"cid": params["cid"], "epoch": self.device.engine.roster(params["cid"]).epoch}

    def remove(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        self.device.remove(params["cid"], params["pids"])
        return {"cid": params["cid"], "epoch": self.device.engine.roster(params["cid"]).epoch}

    def leave(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        self.device.leave(params["cid"])
        return {"cid": params["cid"]}

    # -- received messages ------------------------------------------------------------

    def messages(self, params: dict[str, Any], caller: Caller) -> list[dict[str, Any]]:  # noqa: ARG002
        self._known(params.get("cid"))
        rows = self.device.state.received(
            params.get("cid"),
            after_id=params.get("after_id", 0),
            limit=min(params.get("limit", MAX_ROWS), MAX_ROWS),
        )
        return [row.to_json() for row in _bounded(rows)]

    def take(self, params: dict[str, Any], caller: Caller) -> list[dict[str, Any]]:  # noqa: ARG002
        """Rows past the shared listen cursor, which moves past them first: each
        message is taken once, across every ``listen`` (through the daemon or not)."""
        cid = params.get("cid")
        self._known(cid)
        limit = min(params.get("limit", 64), MAX_ROWS)
        state = self.device.state
        with self._cursor_lock, state.transaction():
            cursor = int(state.get_meta(LISTEN_CURSOR) or 0)
            rows = _bounded(state.received(cid, after_id=cursor, limit=limit))
            if rows:
                state.set_meta({LISTEN_CURSOR: str(rows[-1].id)})
        return [row.to_json() for row in rows]

    def cursor(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        return {"cursor": int(self.device.state.get_meta(LISTEN_CURSOR) or 0)}

    def mark_read(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:  # noqa: ARG002
        return {"marked": self.device.mark_read(params["cid"])}

    def _known(self, cid: str | None) -> None:
        if cid is not None and cid not in self.device.engine.conversations():
            raise ConfigError(f"unknown conversation {cid}")

    # -- the table --------------------------------------------------------------------

    def methods(self) -> list[Method[Caller]]:
        """The method table (sorted by name), every handler behind the auth check."""
        table = [
            Method(
                "auth",
                "Present the token (TCP only; first request). A wrong one closes the connection.",
                (Param("token", "string", "The token file's content.", max_length=256),),
                self.auth,
                {"type": "object", "properties": {"authorized": {"type": "boolean"}}},
            ),
            Method(
                "conversation.create",
                "Create a conversation (we are its admin), inviting members; its cid.",
                (
                    Param("members", "string[]", "Pids to invite.", False, 256),
                    Param("compress", "boolean", "Compress plaintexts.", False),
                    Param(
                        "sign_every",
                        "integer",
                        "Sign every Nth envelope (0: none).",
                        False,
                        None,
                        0,
                        MAX_SIGN_EVERY,
                    ),
                    Param("low_bandwidth", "boolean", "Compressed, one signature in 32.", False),
                    Param(
                        "require_pq",
                        "boolean",
                        "Admit only members with an ML-KEM-768 key (default true).",
                        False,
                    ),
                    _TIMEOUT,
                ),
                self.create,
                {"type": "object", "properties": {"cid": {"type": "string"}}},
            ),
            Method(
                "conversation.invite",
                "Add members (admins only): a new epoch.",
                (_CID, _PIDS, _TIMEOUT),
                self.invite,
                _EMPTY,
            ),
            Method("conversation.leave", "Leave a conversation.", (_CID,), self.leave, _EMPTY),
            Method(
                "conversation.remove",
                "Remove members (admins only): a new epoch, everyone left re-keys.",
                (_CID, _PIDS),
                self.remove,
                _EMPTY,
            ),
            Method("conversations", "Every known conversation.", (), self.conversations, _ROWS),
            Method(
                "delivery",
                "Wait until the broker acknowledged these sent messages (and, with acks, "
                "that many members receipted each), or the timeout.",
                (
                    Param("ids", "integer[]", "The id of each send's result.", max_length=1024),
                    Param("acks", "integer", "Delivery receipts wanted.", False, None, 0, 1024),
                    _TIMEOUT,
                ),
                self.delivery,
                _EMPTY,
            ),
            Method(
                "drain",
                "Wait until the broker acknowledged the whole outbox (or the timeout).",
                (_TIMEOUT,),
                self.drain,
                _EMPTY,
            ),
            Method(
                "listen.take",
                "Received messages past the shared listen cursor, which moves past them "
                "(each message is taken once across listeners).",
                (
                    Param("cid", "string", "Only this conversation.", False, 64),
                    Param("limit", "integer", "At most this many.", False, None, 1, MAX_ROWS),
                ),
                self.take,
                _ROWS,
            ),
            Method(
                "listen.cursor",
                "The shared listen cursor: the id of the last message taken.",
                (),
                self.cursor,
                _EMPTY,
            ),
            Method(
                "mark_read",
                "Mark received messages of a conversation read (read receipts).",
                (_CID,),
                self.mark_read,
                _EMPTY,
            ),
            Method(
                "members",
                "The current roster of a conversation with fingerprints.",
                (_CID,),
                self.members,
                _EMPTY,
            ),
            Method(
                "messages",
                "Stored received messages (no cursor moves).",
                (
                    Param("cid", "string", "Only this conversation.", False, 64),
                    Param("after_id", "integer", "Only rows after this id.", False, None, 0, 2**62),
                    Param("limit", "integer", "At most this many.", False, None, 1, MAX_ROWS),
                ),
                self.messages,
                _ROWS,
            ),
            Method("outbox", "What waits for the broker.", (), self.outbox, _ROWS),
            Method(
                "presence",
                "Whether each followed member was last seen online (pid to boolean).",
                (),
                self.presence,
                _EMPTY,
            ),
            Method(
                "send",
                "Queue a text durably (answered once it is in the outbox).",
                (
                    _CID,
                    Param("text", "string", "The text.", max_length=MAX_TEXT_BYTES),
                    Param(
                        "idempotency_key",
                        "string",
                        "A retry with the same key returns the first result.",
                        False,
                        MAX_KEY_LENGTH,
                    ),
                ),
                self.send,
                _EMPTY,
            ),
            Method(
                "status",
                "The link (connected, protocol) and the outbox's length.",
                (),
                self.status,
                _EMPTY,
            ),
            Method(
                "subscribe",
                "Stream events to this connection as 'event' notifications.",
                (Param("cids", "string[]", "Only these conversations.", False, 1024),),
                self.subscribe,
                _EMPTY,
            ),
            Method("unsubscribe", "Stop the stream.", (), self.unsubscribe, _EMPTY),
            Method(
                "verify",
                "A participant's fingerprint, compared with one read out of band if given.",
                (
                    Param("pid", "string", "The participant.", max_length=64),
                    Param("fingerprint", "string", "As read out by its owner.", False, 256),
                    _TIMEOUT,
                ),
                self.verify,
                _EMPTY,
            ),
            Method("whoami", "This device's pid and fingerprint.", (), self.whoami, _EMPTY),
        ]
        return [_guarded(m) for m in table]


def _guarded(method: Method[Caller]) -> Method[Caller]:
    if method.name == "auth":
        return method
    inner = method.handler

    def handler(params: dict[str, Any], caller: Caller) -> object:
        if not caller.authorized:
            caller.closing = True
            raise RpcError(
                SERVER_ERROR, "unauthorized: send auth with the token first", {"reason": "auth"}
            )
        return inner(params, caller)

    return Method(method.name, method.summary, method.params, handler, method.result)


# The JSON Schema of each annotation an event field has (a new one fails the schema test).
_FIELD_SCHEMAS: dict[str, dict[str, Any]] = {
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "str | None": {"type": ["string", "null"]},
    "tuple[str, ...]": {"type": "array", "items": {"type": "string"}},
    "tuple[int, ...]": {"type": "array", "items": {"type": "integer"}},
    "ReceiptKind": {"enum": ["delivered", "read"]},
}


def document(control: Control) -> dict[str, Any]:
    """The OpenRPC document of the daemon (docs/device-rpc.openrpc.json), with its
    error codes and the ``event`` notification's types and fields."""
    events = {
        str(cls.type): {
            "type": "object",
            "properties": {
                "type": {"const": str(cls.type)},
                **{f.name: _FIELD_SCHEMAS[str(f.type)] for f in dataclasses.fields(cls)},
            },
        }
        for cls in EVENTS
    }
    return openrpc(
        "fieldchat device daemon (fieldchat device run)",
        "1",
        control.methods(),
        {
            "x-framing": "JSON-RPC 2.0, one JSON object or batch per line (UTF-8, \\n)",
            "x-errors": {str(code): kind for _, code, kind in APP_CODES},
            "x-notifications": {NOTIFICATION: {"params": {"oneOf": list(events.values())}}},
        },
    )


if __name__ == "__main__":  # python -m fieldchat.device.control > docs/device-rpc.openrpc.json
    import json

    with tempfile.TemporaryDirectory() as tmp:
        device = Device(Path(tmp) / "schema.sqlite3", post_quantum=False)
        try:
            json.dump(document(Control(device)), sys.stdout, indent=2, ensure_ascii=False)
            sys.stdout.write("\n")
        finally:
            device.close()
