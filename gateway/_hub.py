"""The live side: fans archived envelopes, grants, rosters and presence out to
WebSocket subscriptions.

The hub follows the archive, not MQTT: it reads ``seq > cursor`` from the store when
this gateway commits (an in-process wake-up) or every ``feed_poll_s`` (commits by
other gateways sharing the database). So a browser sees envelopes in archive order
with their ``seq``, and one number resumes it after a drop. A subscriber whose queue
overflows is cut off (its cursor tells it where to resume); nothing is dropped
silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum

from fieldchat.gateway._archiver import ArchiveListener
from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._store import HistoryStore, RosterRecord, StoredEnvelope, StoredGrant
from fieldchat.schemas import tracing
from fieldchat.schemas.errors import FieldchatError

__all__ = ["Event", "EventKind", "Hub", "Subscription"]

log = logging.getLogger("fieldchat.gateway.hub")
_READ_LIMIT = 1000
_PRESENCE_MAX = 200_000


class EventKind(StrEnum):
    """What an :class:`Event` carries (and the ``op`` of its WebSocket frame)."""

    ENVELOPE = "envelope"
    GRANT = "grant"
    ROSTER = "roster"
    PRESENCE = "presence"


@dataclass(eq=False, slots=True)
class Event:
    """One thing to send to a browser (``kind`` says which field holds it).

    ``text`` caches the encoded frame: one event goes to every socket of its
    conversation, so it is encoded once, not once per socket.
    """

    kind: EventKind
    envelope: StoredEnvelope | None = None
    grant: StoredGrant | None = None
    roster: RosterRecord | None = None
    pid: str | None = None
    status: bytes | None = None
    text: str | None = None
    wire: bytes | None = None  # the WebSocket frame of ``text``, built once too


@dataclass(eq=False)
class Subscription:
    """One WebSocket client: the account's participants and their conversations."""

    pids: frozenset[str]
    conversations: dict[str, tuple[str, ...]]  # cid -> members
    queue: asyncio.Queue[Event]
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peers(self) -> set[str]:
        return {p for members in self.conversations.values() for p in members}

    def offer(self, event: Event) -> None:
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("WebSocket client too slow (%d queued); closing it", self.queue.maxsize)
            self.overflowed.set()


class Hub(ArchiveListener):
    """Reads what the archive committed and offers it to the subscriptions."""

    def __init__(
        self, store: HistoryStore, metrics: GatewayMetrics, *, poll_s: float, queue_max: int
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.poll_s = poll_s
        self.queue_max = queue_max
        self.presence_of: dict[str, bytes] = {}
        # Open sockets that announced each browser participant's presence: when the last
        # one closes the gateway says "offline" for it, as a device's last will does.
        self.announced: Counter[str] = Counter()
        self._subs: set[Subscription] = set()
        self._wake = asyncio.Event()
        self._starting = asyncio.Lock()  # one read of where the feed starts, not two
        self._cursor: int | None = None  # None while nobody listens
        self._grant_cursor: int | None = None
        self.tracer = tracing.tracer("gateway")  # docs/tracing.md; None when off

    # -- ArchiveListener ---------------------------------------------------------------

    def committed(self, max_seq: int | None, grants: int) -> None:  # noqa: ARG002
        self._wake.set()

    def roster(self, record: RosterRecord) -> None:
        event = Event(EventKind.ROSTER, roster=record)
        for sub in list(self._subs):
            listed = sub.pids & set(record.members)
            known = record.cid in sub.conversations
            met: set[str] = set()
            if listed:
                met = set(record.members) - sub.peers
                sub.conversations[record.cid] = record.members
            elif known:
                del sub.conversations[record.cid]
            if listed or known:
                sub.offer(event)
            for pid in sorted(met):  # a new peer's presence now, not at the next connect
                status = self.presence_of.get(pid)
                if status is not None:
                    sub.offer(Event(EventKind.PRESENCE, pid=pid, status=status))

    def presence(self, pid: str, payload: bytes) -> None:
        if pid not in self.presence_of and len(self.presence_of) >= _PRESENCE_MAX:
            self.presence_of.pop(next(iter(self.presence_of)))
        self.presence_of[pid] = payload
        event = Event(EventKind.PRESENCE, pid=pid, status=payload)
        for sub in list(self._subs):
            if pid in sub.peers:
                sub.offer(event)

    # -- subscriptions -----------------------------------------------------------------

    async def subscribe(self, pids: Collection[str]) -> Subscription:
        """Register a client first, so nothing committed from now on can be missed;
        the caller then backfills from its own cursor and skips what it already sent."""
        conversations = await self.store.conversations_of(pids)
        async with self._starting:
            # Two first sockets at once both saw no cursor; the later read then moved
            # the feed past rows committed between the reads, which the earlier
            # socket, registered already, never got live.
            if self._cursor is None:
                self._cursor = await self.store.max_seq()
                self._grant_cursor = await self.store.max_grant_seq()
        sub = Subscription(frozenset(pids), dict(conversations), asyncio.Queue(self.queue_max))
        self._subs.add(sub)
        self.metrics.ws_clients.set(len(self._subs))
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        self.metrics.ws_clients.set(len(self._subs))
        if not self._subs:
            self._cursor = self._grant_cursor = None

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the archive until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                # Not wait_for: on Python 3.11 it returns when the event is set as the
                # task is cancelled, and the cancellation is lost: the gateway's stop
                # then waited for the hub forever (a SIGTERM under load, issue 14).
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()
            if not self._subs:
                continue
            try:
                await self._deliver()
            except FieldchatError as exc:
                log.warning("live feed read failed: %s", exc)
            except Exception:  # a long-running loop: log and keep serving (STYLE.md)
                log.exception("live feed failed; retrying")

    async def _deliver(self) -> None:
        while self._subs and self._cursor is not None:
            rows = await self.store.since(self._cursor, limit=_READ_LIMIT)
            for row in rows:
                event = Event(EventKind.ENVELOPE, envelope=row)
                offered = 0
                for sub in list(self._subs):
                    if row.cid in sub.conversations:
                        sub.offer(event)
                        offered += 1
                if self.tracer is not None and offered:  # one span per fan-out, not per socket
                    self.tracer.span(
                        "ws deliver",
                        row.cid,
                        row.data,
                        kind="producer",
                        attributes={"fieldchat.ws.subscribers": offered, "fieldchat.seq": row.seq},
                    )
                self._cursor = row.seq
            if len(rows) < _READ_LIMIT:
                break
        await self._deliver_grants()

    async def _deliver_grants(self) -> None:
        pids = {p for sub in self._subs for p in sub.pids}
        if not pids or self._grant_cursor is None:
            return
        grants = await self.store.grants_for(pids, after=self._grant_cursor, limit=_READ_LIMIT)
        for grant in grants:
            event = Event(EventKind.GRANT, grant=grant)
            for sub in list(self._subs):
                if grant.recipient in sub.pids:
                    sub.offer(event)
            self._grant_cursor = grant.seq
