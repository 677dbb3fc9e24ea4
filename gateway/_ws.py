"""The WebSocket bridge ``/ws``: browsers publish what they sealed and receive their
conversations live.

Authenticated by the session cookie (and the ``Origin`` must be this host, against
cross-site WebSocket hijacking). Frames are JSON text; byte strings are base64.

Connect with ``/ws?cursor=N&grant_cursor=M`` to resume: the gateway first sends
everything archived after ``N`` in the account's conversations (and grants after
``M``), then ``caught_up``, then live events. Each envelope carries its ``seq``; the
largest seq seen is the cursor to resume with after a drop. Without ``cursor`` the
stream starts at the present: the ``hello``'s cursor, read after the handshake, so
what is archived between the handshake and the ``hello`` is history (fetch it with
``cursor=`` or the history API), not live.

With ``batch=1`` a client accepts a JSON **array** of the frames below wherever one
frame could come, in order: when several live events wait for one socket, they leave
as one WebSocket frame (one ``send()``; the system call, not Python, is most of a
fan-out's cost per socket), so a gateway that fell behind catches up instead of
falling further behind. Clients that do not ask get one frame per event.

Server → browser::

    {"op":"hello","cursor":N,"grant_cursor":M,"pids":[…],"conversations":{cid:[pid…]}}
    {"op":"envelope","seq":…,"cid":…,"epoch":…,"sender":…,"sender_pid":…,"chain":…,
     "step":…,"data":b64}
    {"op":"grant","seq":…,"cid":…,"recipient":…,"granter":…,"data":b64}
    {"op":"roster","cid":…,"epoch":…,"members":[…],"data":b64}
    {"op":"presence","pid":…,"status":b64}
    {"op":"caught_up","cursor":N}
    {"op":"ack","id":…}   {"op":"error","id":…,"reason":…,"detail":…}   {"op":"pong"}

Browser → server::

    {"op":"publish","id":…,"kind":"msg","cid":…,"data":b64}   sealed envelope
    {"op":"publish","id":…,"kind":"roster"|"grant"|"bundle","data":b64}
                                           a delivery (kind "grant") names its "recipient"
    {"op":"publish","id":…,"kind":"status","pid":…,"data":b64}
    {"op":"ping"}

A publish is checked before it goes out: an envelope's sender (roster index of its
epoch) must be one of the account's participants and its signature must verify
against that participant's bundle; a roster, grant or bundle must be signed by one.
"The account's participants" are those it proved it holds (``Account.pids``); a pid
claimed without proof (before schema 2) gives a socket nothing.
A roster must also chain to the archive (found its conversation within its signer's
quota, or follow the archived epoch before it; ``Archiver.submit_roster``): the
gateway archives it and publishes it, retained, on ``c/{cid}/roster``, where on
Mosquitto and NATS only a verifier may write.
``ack`` follows the broker's PUBACK. Frames that are not the protocol get an
``error``; after ``MAX_BAD_FRAMES`` the socket is closed (1008).

Size: uvicorn closes a socket whose message passes ``ws_max_message_bytes`` (256 KiB,
close code 1009) before it reaches us (``gateway._run.uvicorn_options``, used by
``gateway run`` and ``fieldchat up``); a text frame over ``MAX_FRAME_BYTES`` (a 64 KiB
envelope in base64 and its JSON) gets an ``error`` (``limit``) before it is parsed,
under any server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from fieldchat.gateway._auth import Caller
from fieldchat.gateway._errors import Forbidden, TooManyRequests
from fieldchat.gateway._hub import Event, EventKind, Subscription
from fieldchat.gateway._metrics import RejectSource
from fieldchat.gateway._state import Gateway
from fieldchat.gateway._verify import MAX_STATUS_BYTES
from fieldchat.schemas import MAX_ENVELOPE_BYTES, Bundle, Envelope, Grant, Roster, validate_id
from fieldchat.schemas.delivery import Delivery, is_delivery
from fieldchat.schemas.envelope import verify_envelope_signature
from fieldchat.schemas.errors import (
    FieldchatError,
    LimitExceeded,
    NotAMember,
    SignatureRequired,
    WireError,
)

try:  # uvicorn's own protocol class: internal, so guarded (see _Direct)
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIO,
    )
except ImportError:  # another uvicorn: every frame through the ASGI send
    _SansIO = None  # type: ignore[assignment, misc]

__all__ = [
    "BATCH_FRAME_BYTES",
    "DIRECT_NEEDS",
    "MAX_BAD_FRAMES",
    "MAX_FRAME_BYTES",
    "direct_missing",
    "websocket_endpoint",
]

log = logging.getLogger("fieldchat.gateway.ws")

MAX_FRAME_BYTES = 4 * MAX_ENVELOPE_BYTES // 3 + 1024  # a base64 envelope and its JSON
MAX_BAD_FRAMES = 16
STATUS_OFFLINE = b"offline"  # the payload of a device's last will (device/client.py)
RAW_SEND_KEY = "fieldchat.raw_send"  # the server's own ASGI send (set by the app's guard)
BATCH_FRAME_BYTES = 65_536  # the largest array frame of a batch=1 client (but one event)
_BACKFILL_PAGE = 500
CLOSE_POLICY = 1008
CLOSE_LAGGING = 4000  # resume from your cursor
CLOSE_UNAUTHENTICATED = 4401


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _same_origin(ws: WebSocket) -> bool:
    origin = ws.headers.get("origin")
    if origin is None:  # not a browser (browsers always send Origin on WebSockets)
        return True
    return urlsplit(origin).netloc == ws.headers.get("host", "")


def _encode(event: Event) -> str:
    if event.text is None:
        event.text = json.dumps(_frame(event), separators=(",", ":"))
    return event.text


def _wire(text: str) -> bytes:
    """The bytes of one unfragmented, unmasked server text frame (RFC 6455 §5.2)."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


# What _Direct reads of uvicorn's websockets-sansio protocol (uvicorn 0.55, websockets
# 15, the version aMQTT pins), each with what it must offer. The only reach into
# uvicorn's internals; tests/gateway/test_ws_direct.py checks every one on a live socket
# and names the one that changed. If one changes, _Direct falls back to the ASGI send.
DIRECT_NEEDS: dict[str, tuple[str, ...]] = {
    "close_sent": (),  # a bool: our close frame went
    "handshake_complete": (),  # a bool: the opening handshake is done
    "writable": ("is_set",),  # an asyncio.Event, clear while the transport pushes back
    "transport": ("write", "is_closing"),  # the asyncio transport
}


def direct_missing(proto: object) -> list[str]:
    """What of :data:`DIRECT_NEEDS` ``proto`` lacks (``"writable.is_set"``…), or the
    protocol class itself (``"WebSocketsSansIOProtocol"``) when it is not uvicorn's."""
    if _SansIO is None or not isinstance(proto, _SansIO):
        return ["WebSocketsSansIOProtocol"]
    missing = []
    for name, needs in DIRECT_NEEDS.items():
        if not hasattr(proto, name):
            missing.append(name)
            continue
        value = getattr(proto, name)
        if value is None:  # transport: not connected yet, nothing to check
            continue
        missing += [f"{name}.{need}" for need in needs if not hasattr(value, need)]
    return missing


_warned_missing = False


class _Direct:
    """Writes ready-made frames straight to uvicorn's transport, when that is safe.

    A fan-out sends the same frame to every socket of a conversation. Through ASGI each
    send is Starlette's checks and exception wrappers, UTF-8 encoding, a websockets
    ``Frame`` built and serialised, then ``transport.write``: of the ≈ 35-40 µs a socket
    and frame cost here (profiled), the system call was a quarter. The wire bytes of a server
    frame are the same for every socket (unmasked, RFC 6455 §5.1), so they are built
    once per event (:func:`_wire`) and written directly, but only to uvicorn's
    websockets-sansio protocol (what ``gateway run`` serves ``/ws`` with) while it is
    open and not applying back-pressure; otherwise the ASGI ``send`` is used. Data
    frames carry no protocol state (uvicorn never fragments, and an uncompressed frame
    is valid even where permessage-deflate was agreed, RFC 7692 §6), and everything
    runs on the one event loop, so frames never interleave.

    The protocol's attributes are uvicorn's internals (:data:`DIRECT_NEEDS`): if a
    uvicorn lacks one, every frame goes through the ASGI ``send`` (slower, correct)
    and a warning names what changed, once per process.
    """

    def __init__(self, raw_send: object) -> None:
        global _warned_missing  # noqa: PLW0603 - one warning per process, not per socket
        proto = getattr(raw_send, "__self__", None)
        missing = direct_missing(proto)
        self._proto: Any = None if missing else proto
        if missing and _SansIO is not None and isinstance(proto, _SansIO) and not _warned_missing:
            _warned_missing = True
            log.warning(
                "uvicorn's WebSocketsSansIOProtocol has no %s: /ws frames go through the "
                "ASGI send (see gateway._ws.DIRECT_NEEDS)",
                ", ".join(missing),
            )

    def write(self, frame: bytes) -> bool:
        """True when ``frame`` went out; False: use the ASGI ``send``."""
        p = self._proto
        if p is None or p.close_sent or not p.handshake_complete or not p.writable.is_set():
            return False
        if p.transport.is_closing():
            return False
        p.transport.write(frame)
        return True


class PublishKind(StrEnum):
    """What a browser's ``publish`` frame carries (its ``kind``)."""

    MSG = "msg"
    ROSTER = "roster"
    GRANT = "grant"
    BUNDLE = "bundle"
    STATUS = "status"


def _publish_kind(value: object) -> PublishKind | None:
    """None for anything else: refused where the frame is judged, after its data."""
    if isinstance(value, str) and value in PublishKind.__members__.values():
        return PublishKind(value)
    return None


def _frame(event: Event) -> dict[str, Any]:
    if event.kind is EventKind.ENVELOPE:
        e = event.envelope
        assert e is not None
        return {
            "op": "envelope",
            "seq": e.seq,
            "cid": e.cid,
            "epoch": e.epoch,
            "sender": e.sender,
            "sender_pid": e.sender_pid,
            "chain": e.chain,
            "step": e.step,
            "data": _b64(e.data),
        }
    if event.kind is EventKind.GRANT:
        g = event.grant
        assert g is not None
        return {
            "op": "grant",
            "seq": g.seq,
            "cid": g.cid,
            "recipient": g.recipient,
            "granter": g.granter,
            "data": _b64(g.data),
        }
    if event.kind is EventKind.ROSTER:
        r = event.roster
        assert r is not None
        return {
            "op": "roster",
            "cid": r.cid,
            "epoch": r.epoch,
            "members": list(r.members),
            "data": _b64(r.data),
        }
    assert event.status is not None
    return {"op": "presence", "pid": event.pid, "status": _b64(event.status)}


def _groups(texts: list[str]) -> list[list[str]]:
    """Consecutive frames in groups of at most ``BATCH_FRAME_BYTES`` (one frame alone may
    be larger): a batch bounds the syscalls, not the memory of a client."""
    groups: list[list[str]] = [[]]
    size = 0
    for text in texts:
        if groups[-1] and size + len(text) > BATCH_FRAME_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += len(text) + 1
    return groups


class _BadFrame(FieldchatError):
    reason = "bad_frame"


def _cursor(ws: WebSocket, name: str) -> int | None:
    raw = ws.query_params.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise _BadFrame(f"{name} must be a non-negative integer")
    return int(raw)


class _Session:
    """One connected browser."""

    def __init__(
        self, ws: WebSocket, gw: Gateway, who: Caller, sub: Subscription, *, batch: bool = False
    ) -> None:
        self.ws = ws
        self.batch = batch
        self.gw = gw
        self.who = who
        self.sub = sub
        self.sent_seq = 0
        self.sent_grant = 0
        self.bad_frames = 0
        self.announced: set[str] = set()  # participants whose status this socket set

    async def farewell(self) -> None:
        """Say "offline" for each participant whose last announcing socket this was: a
        closed tab must not stay "online" (a device's broker does this with its will)."""
        hub, gw = self.gw.hub, self.gw
        for pid in self.announced:
            hub.announced[pid] -= 1
            if hub.announced[pid] > 0:
                continue
            del hub.announced[pid]
            if hub.presence_of.get(pid) != STATUS_OFFLINE:
                await gw.publish_best_effort(gw.topics.status(pid), STATUS_OFFLINE, retain=True)
        self.announced.clear()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(frame, separators=(",", ":")))

    async def backfill(self, cursor: int, grant_cursor: int) -> None:
        store = self.gw.store
        self.sent_seq, self.sent_grant = cursor, grant_cursor
        cids = list(self.sub.conversations)
        while cids:
            rows = await store.since(self.sent_seq, cids=cids, limit=_BACKFILL_PAGE)
            for row in rows:
                await self.send(_frame(Event(EventKind.ENVELOPE, envelope=row)))
                self.sent_seq = row.seq
            self.gw.metrics.ws_sent.inc(len(rows))
            if len(rows) < _BACKFILL_PAGE:
                break
        while self.who.pids:
            grants = await store.grants_for(
                self.who.pids, after=self.sent_grant, limit=_BACKFILL_PAGE
            )
            for g in grants:
                await self.send(_frame(Event(EventKind.GRANT, grant=g)))
                self.sent_grant = g.seq
            if len(grants) < _BACKFILL_PAGE:
                break
        for pid in self.sub.peers:
            status = self.gw.hub.presence_of.get(pid)
            if status is not None:
                await self.send(_frame(Event(EventKind.PRESENCE, pid=pid, status=status)))
        await self.send({"op": "caught_up", "cursor": self.sent_seq})

    async def writer(self) -> None:
        """Send what the hub queued. The hot path of a fan-out (one event, every socket
        of a conversation): one wake-up per burst, the frame encoded once (``_encode``,
        ``_wire``) and written directly where it can be (:class:`_Direct`), several as
        one array for ``batch=1`` clients, the counter bumped once per burst."""
        queue = self.sub.queue
        send = self.ws.send
        direct = _Direct(self.ws.scope.get(RAW_SEND_KEY))
        while True:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            ready = self._fresh(events)
            if self.batch and len(ready) > 1:
                for group in _groups([_encode(e) for e in ready]):
                    text = f"[{','.join(group)}]"
                    if not direct.write(_wire(text)):
                        await send({"type": "websocket.send", "text": text})
            else:
                for event in ready:
                    text = _encode(event)
                    if event.wire is None:
                        event.wire = _wire(text)
                    if not direct.write(event.wire):
                        await send({"type": "websocket.send", "text": text})

    def _fresh(self, events: list[Event]) -> list[Event]:
        """The events not sent yet (backfill and live overlap by design), in order."""
        ready: list[Event] = []
        sent = 0
        for event in events:
            if event.envelope is not None:
                if event.envelope.seq <= self.sent_seq:
                    continue
                self.sent_seq = event.envelope.seq
                sent += 1
            elif event.grant is not None:
                if event.grant.seq <= self.sent_grant:
                    continue
                self.sent_grant = event.grant.seq
            ready.append(event)
        if sent:
            self.gw.metrics.ws_sent.inc(sent)
        return ready

    async def reader(self) -> None:  # noqa: PLR0912 - one branch per frame outcome
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            ref: Any = None
            try:
                if text is None:
                    raise _BadFrame("binary frames are not part of the protocol")
                if len(text) > MAX_FRAME_BYTES:
                    raise LimitExceeded("frame too large")
                try:
                    frame = json.loads(text)
                except ValueError:
                    raise _BadFrame("not JSON") from None
                if not isinstance(frame, dict):
                    raise _BadFrame("a frame is a JSON object")
                ref = frame.get("id")
                if not isinstance(ref, (str, int, type(None))) or (
                    isinstance(ref, str) and len(ref) > 64
                ):
                    ref = None
                    raise _BadFrame("id must be a short string or an integer")
                op = frame.get("op")
                if op == "ping":
                    await self.send({"op": "pong"})
                elif op == "publish":
                    await self.publish(frame)
                    await self.send({"op": "ack", "id": ref})
                else:
                    raise _BadFrame("unknown op")
            except FieldchatError as exc:
                self.gw.metrics.reject(RejectSource.WS, exc.reason)
                await self.send(
                    {"op": "error", "id": ref, "reason": exc.reason, "detail": str(exc)[:200]}
                )
                if isinstance(exc, (_BadFrame, WireError)):
                    self.bad_frames += 1
                    if self.bad_frames >= MAX_BAD_FRAMES:
                        await self.ws.close(CLOSE_POLICY, "too many bad frames")
                        return

    async def publish(self, frame: dict[str, Any]) -> None:  # noqa: PLR0912 - one per kind
        kind = _publish_kind(frame.get("kind"))
        raw = frame.get("data")
        if not isinstance(raw, str):
            raise _BadFrame("data must be a base64 string")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise _BadFrame("data is not base64") from None
        gw, mine = self.gw, self.who.pids
        if kind is PublishKind.MSG:
            cid = validate_id(frame.get("cid"), "cid")
            await self._check_envelope(cid, data)
            start = time.time_ns()
            await gw.archiver.publish(gw.topics.msg(cid), data)
            if gw.archiver.tracer is not None:  # a browser's envelope: its root span here
                gw.archiver.tracer.publish(gw.topics.msg(cid), data, start_ns=start)
        elif kind is PublishKind.ROSTER:
            roster = Roster.from_bytes(data)
            if roster.signer not in mine:
                raise Forbidden("the roster is not signed by your participant")
            await gw.archiver.submit_roster(roster, data)
            await gw.archiver.publish(gw.topics.roster(roster.cid), data, retain=True)
            await self._send_chain_to_joiners(roster)
        elif kind is PublishKind.GRANT and is_delivery(data):
            # An epoch secret (PROTOCOL.md §5.3) names no sender and no recipient: the
            # frame names the recipient; the roster's commit authenticates the content,
            # so the gateway has nothing to check but the shape.
            Delivery.from_bytes(data)
            recipient = validate_id(frame.get("recipient"), "recipient")
            await gw.archiver.publish(gw.topics.inbox(recipient), data)
        elif kind is PublishKind.GRANT:
            grant = Grant.from_bytes(data)
            if grant.granter not in mine:
                raise Forbidden("the grant is not signed by your participant")
            await gw.archiver.publish(gw.topics.inbox(grant.recipient), data)
        elif kind is PublishKind.BUNDLE:
            bundle = Bundle.from_bytes(data)
            if bundle.pid not in mine:
                raise Forbidden("not your participant's bundle")
            await gw.archiver.publish(gw.topics.bundle(bundle.pid), data, retain=True)
        elif kind is PublishKind.STATUS:
            pid = validate_id(frame.get("pid"), "pid")
            if pid not in mine:
                raise Forbidden("not your participant")
            if len(data) > MAX_STATUS_BYTES:
                raise LimitExceeded("status too large")
            await gw.archiver.publish(gw.topics.status(pid), data, retain=True)
            if pid not in self.announced:
                self.announced.add(pid)
                gw.hub.announced[pid] += 1
        else:
            raise _BadFrame("kind must be msg, roster, grant, bundle or status")
        gw.metrics.ws_published.labels(kind=kind).inc()

    async def _send_chain_to_joiners(self, roster: Roster) -> None:
        """Each member a browser's roster adds gets the earlier rosters of the chain on
        its inbox, as a device admin sends them (PROTOCOL.md §5.2): a joiner without a
        gateway verifies the chain from epoch 0 with them. Relayed here from the
        archive (rosters prove themselves; who relays them does not matter), so the
        page does not upload what the gateway holds already."""
        if roster.epoch == 0:
            return
        earlier = [r for r in await self.gw.store.rosters(roster.cid) if r.epoch < roster.epoch]
        before = next((r for r in earlier if r.epoch == roster.epoch - 1), None)
        if before is None:
            return
        for pid in sorted(set(roster.pids) - set(before.members)):
            for record in sorted(earlier, key=lambda r: r.epoch):
                await self.gw.archiver.publish(self.gw.topics.inbox(pid), record.data)

    async def _check_envelope(self, cid: str, data: bytes) -> None:
        envelope = Envelope.from_bytes(data)
        roster = await self.gw.archiver.roster(cid, envelope.epoch)
        if roster is None:
            raise NotAMember("no roster archived for this conversation and epoch")
        sender = roster.member_at(envelope.sender).pid
        if sender not in self.who.pids:
            raise Forbidden("the envelope's sender is not your participant")
        if envelope.signature is None:
            if roster.policy.must_sign(envelope.step):
                raise SignatureRequired("the conversation policy requires a signature")
            return
        bundle = await self.gw.archiver.bundle(sender)
        if bundle is None:
            raise NotAMember("no bundle for your participant: register it first")
        # CryptoError (reason "auth") when it does not verify; off the event loop.
        await asyncio.to_thread(verify_envelope_signature, data, cid, bundle.ed25519)


async def websocket_endpoint(ws: WebSocket) -> None:
    """``/ws``: see the module docstring."""
    gw: Gateway = ws.app.state.gateway
    if not _same_origin(ws):
        gw.metrics.reject(RejectSource.WS, "origin")
        await ws.close(CLOSE_POLICY, "cross-origin WebSocket refused")
        return
    # The session's verified participants only (issue 13), read afresh: they hold for
    # the socket's life, and a claim just made through another gateway must count.
    try:
        who = await gw.auth(ws, fresh=True)
    except TooManyRequests:  # signed headers past their budget: no account anyway
        who = None
    if who is None or who.account is None:
        gw.metrics.reject(RejectSource.WS, "unauthenticated")
        await ws.close(CLOSE_UNAUTHENTICATED, "log in first")
        return
    try:
        cursor = _cursor(ws, "cursor")
        grant_cursor = _cursor(ws, "grant_cursor")
    except _BadFrame as exc:
        gw.metrics.reject(RejectSource.WS, exc.reason)
        await ws.close(CLOSE_POLICY, str(exc))
        return
    await ws.accept()
    sub = await gw.hub.subscribe(who.pids)
    session = _Session(ws, gw, who, sub, batch=ws.query_params.get("batch") == "1")
    tasks: list[asyncio.Task[Any]] = []
    try:
        start = cursor if cursor is not None else await gw.store.max_seq()
        await session.send(
            {
                "op": "hello",
                "cursor": start,
                "grant_cursor": grant_cursor or 0,
                "pids": sorted(who.pids),
                "conversations": {c: list(m) for c, m in sub.conversations.items()},
            }
        )
        await session.backfill(start, grant_cursor or 0)
        tasks = [
            asyncio.create_task(session.reader()),
            asyncio.create_task(session.writer()),
            asyncio.create_task(sub.overflowed.wait()),
        ]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[2] in done and ws.client_state is WebSocketState.CONNECTED:
            await ws.close(CLOSE_LAGGING, "too slow: reconnect with your cursor")
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, WebSocketDisconnect):
                log.warning("WebSocket session ended: %r", error)
    except WebSocketDisconnect:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gw.hub.unsubscribe(sub)
        await session.farewell()
