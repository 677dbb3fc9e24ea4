"""The archiver: an MQTT client that stores every envelope, exactly once.

Delivery contract (MQTT 5 §4.3.2, §4.6):

* Persistent session (``clean_start=False`` and a session expiry), QoS 1, so the
  broker queues while we are away and redelivers what we did not acknowledge.
* **PUBACK after commit.** Our own client (``fieldchat.gateway._mqtt``, which says why not
  aiomqtt) acknowledges only when told: after the batch is committed, in receive order
  as MQTT 5 §4.6 asks. A crash between commit and ack means a redelivery, which the
  unique key absorbs; a crash before the commit loses nothing because nothing was
  acknowledged.
* Our Receive Maximum bounds the unacknowledged messages in flight, hence our
  memory: the broker stops sending until we acknowledge.

Envelopes whose roster (of their epoch) or sender bundle has not arrived yet are
stored as *pending* and acknowledged; they are verified and moved to the archive
when the roster or bundle arrives (immediately, or by the periodic sweep when another
gateway archived it), and dropped as ``unverifiable`` after ``pending_ttl_s``. Per
conversation and per sender the pending store has quotas of its own.

Rosters come from ``c/+/roster``, ``c/+/propose`` (an admin's submission), inboxes
(the earlier rosters of a chain, sent to a new member) and browsers. One is adopted
only when it chains to the archived epoch before it (``fieldchat.gateway._rosters``); one whose
predecessor is missing is held until it arrives. A roster adopted from ``propose``
is published, retained, on ``c/{cid}/roster``: on Mosquitto and NATS the gateway is
the verifier that writes it. When the broker shows an older, refused or empty
retained roster there, the gateway publishes its archived head again.

With ``share_group`` set, envelopes come through ``$share/{group}/…/c/+/msg`` so
gateways split them; rosters, proposals, bundles, presence and grants are plain
subscriptions, every gateway needs all of them.

The broker must keep routing to the archiver (``fieldchat.gateway._routing``): it subscribes at
every connection (Mosquitto forgets ``$share/`` subscriptions of a restored session),
reconnects within 0.5 s of the broker coming back, and sends canaries through the
shared subscription to find a subscription the broker dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fieldchat.gateway._errors import Forbidden
from fieldchat.gateway._metrics import Metrics
from fieldchat.gateway._mqtt import MqttClient, Publish
from fieldchat.gateway._quota import RefusalLog
from fieldchat.gateway._rosters import Healer, RosterRefused, Source, Verdict, judge
from fieldchat.gateway._routing import (
    CANARY_CID,
    CANARY_SECRET,
    RECONNECT_REFUSED_S,
    Backoff,
    Canary,
)
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._store import (
    ArchiveBatch,
    ArchiveResult,
    GrantRecord,
    HeldRoster,
    HistoryStore,
    NewEnvelope,
    PendingEnvelope,
    RosterRecord,
)
from fieldchat.gateway._verify import (
    Parsed,
    Rejected,
    TopicCache,
    classify,
    classify_all,
    verify_signatures,
)
from fieldchat.schemas import Bundle, Envelope, Roster, TopicKind, Topics, tracing
from fieldchat.schemas.errors import (
    ConfigError,
    ConnectFailed,
    FieldchatError,
    NotAMember,
    NotAuthorized,
    TransportError,
)
from fieldchat.schemas.frame import is_frame

__all__ = ["ArchiveListener", "Archiver", "MqttFactory", "Uploaded", "mqtt_factory"]

log = logging.getLogger("fieldchat.gateway.archiver")

MqttFactory = Callable[[], MqttClient]
_CACHE_MAX = 20_000
_CANARY_POLL_S = 0.1  # how often the sender looks in the database for its canary
_CANARY_BACKLOG_FACTOR = 6  # a replica draining full batches waits up to 6 timeouts
_CANARY_RECONNECT_AFTER = 3  # failures in a row (each followed by a resubscription)
_SWEEP_LIMIT = 1000
_CHEAP_SUFFIXES = ("/msg", "/status")  # parsed on the loop (see ``_classify``)
_VERIFY_INLINE_MAX = 2  # envelopes verified on the loop rather than in the pool
_PROMOTE_ROUNDS = 16  # held-roster adoption rounds per call (each adopts at least one)
_OUTGOING_MAX = 10_000  # conversations whose roster waits to be republished
_REPUBLISH_ATTEMPTS = 5
_SOURCES = {
    TopicKind.ROSTER: Source.ROSTER,
    TopicKind.PROPOSE: Source.PROPOSE,
    TopicKind.INBOX: Source.INBOX,
}


class ArchiveListener:
    """What the archiver tells the live side (the WebSocket hub). No-ops by default."""

    def committed(self, max_seq: int | None, grants: int) -> None:
        """New envelopes up to ``max_seq`` and/or ``grants`` new grants are committed."""

    def roster(self, record: RosterRecord) -> None:
        """A roster was archived."""

    def presence(self, pid: str, payload: bytes) -> None:
        """A participant's retained status changed."""


def mqtt_tls(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The TLS context for ``mqtts://`` (None for plain ``mqtt://``), built at start so a
    missing or unreadable CA file is one clear error, not a reconnect loop.

    Raises:
        ConfigError: ``mqtt_ca_file`` without ``mqtts://``, or a CA file that cannot be read.
    """
    secure = settings.mqtt_url.startswith("mqtts:")
    ca = settings.mqtt_ca_file
    if ca is not None and not secure:
        raise ConfigError("mqtt_ca_file is set but mqtt_url is not mqtts://")
    if not secure:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot read the MQTT CA file {ca}: {exc}") from None


def mqtt_factory(settings: GatewaySettings) -> MqttFactory:
    """The default MQTT client maker: persistent session, our Receive Maximum (v5)."""
    tls = mqtt_tls(settings)

    def make() -> MqttClient:
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        return MqttClient(
            settings.mqtt_host,
            settings.mqtt_port,
            client_id=settings.mqtt_client_id,
            protocol=settings.mqtt_protocol,
            username=settings.mqtt_username,
            password=password,
            tls=tls,
            keepalive=30,
            session_expiry_s=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
            inbox_max=settings.receive_maximum,
            fallback_311=settings.mqtt_fallback_311,
        )

    return make


class _Lru(OrderedDict[Any, Any]):
    def put(self, key: Any, value: Any) -> None:  # noqa: ANN401
        self[key] = value
        self.move_to_end(key)
        while len(self) > _CACHE_MAX:
            self.popitem(last=False)


class Archiver:
    """Subscribes, verifies, batches, commits, acknowledges; reconnects forever.

    Args:
        settings: gateway settings (topics, batching, share group).
        store: where to archive.
        metrics: counters to update.
        listener: told about commits, rosters and presence (the WebSocket hub).
        mqtt: makes the client (tests inject one; default from ``settings``).
    """

    def __init__(
        self,
        settings: GatewaySettings,
        store: HistoryStore,
        metrics: Metrics,
        *,
        listener: ArchiveListener | None = None,
        mqtt: MqttFactory | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.listener = listener or ArchiveListener()
        self.topics = Topics(settings.topic_prefix)
        self._topic_cache = TopicCache(self.topics)
        self.counters: Counter[str] = Counter()
        self._make_client = mqtt or mqtt_factory(settings)
        self._client: MqttClient | None = None
        self._rosters: _Lru = _Lru()
        self._bundles: _Lru = _Lru()
        self._pool = ThreadPoolExecutor(settings.verify_workers, thread_name_prefix="fc-verify")
        self._pending_count = 0
        self._last_batch = 0
        self.refusals = RefusalLog(metrics)
        self._healer = Healer()
        self._heads: _Lru = _Lru()  # cid -> the newest archived epoch seen by this gateway
        self._announced: _Lru = _Lru()  # (cid, epoch) rosters told to the listener
        self._outgoing: dict[str, _Outgoing] = {}  # cid -> the roster to republish
        self._publisher: asyncio.Task[None] | None = None
        # cids whose roster was adopted outside the loop (a browser's): the loop adopts
        # the held rosters and pending envelopes that waited for it
        self._elsewhere: set[str] = set()
        self.connected = asyncio.Event()
        self.tracer = tracing.tracer("gateway")  # docs/tracing.md; None when off
        self.session_present: bool | None = None  # what the broker said at the last CONNECT
        self._canary: Canary | None = None  # made at the first connection (shared key)
        self._canary_topic = self.topics.msg(CANARY_CID)
        self._canary_waiting: dict[bytes, asyncio.Event] = {}  # nonces this replica sent
        self._canary_failures = 0  # in a row
        self._watcher: asyncio.Task[None] | None = None
        self._backlog = False  # the last batch was full: draining a queue
        self._outage: tuple[float, int] | None = None  # (since, failed attempts)

    # -- public ------------------------------------------------------------------------

    async def run(self) -> None:
        """Archive until cancelled, reconnecting after broker failures: at once, then
        at most every ``RECONNECT_MAX_S`` (``gateway._routing.Backoff``; why there)."""
        backoff = Backoff()
        self._pending_count = await self.store.pending_count()
        self.metrics.pending.set(self._pending_count)
        while True:
            refused = False
            try:
                await self._session()
            except NotAuthorized as exc:
                refused = True
                log.warning(
                    "the broker refused the archiver (%s); again in %.0f s",
                    exc,
                    RECONNECT_REFUSED_S,
                )
            except TransportError as exc:
                self._lost(exc)
            except Exception:  # a long-running loop: log and keep serving (STYLE.md)
                log.exception("archiver failed; reconnecting")
            finally:
                if self.connected.is_set():
                    backoff.reset()  # it worked: the next attempt goes at once
                self._client = None
                self.connected.clear()
                self.metrics.mqtt_connected.set(0)
            await asyncio.sleep(RECONNECT_REFUSED_S if refused else backoff.next())

    def _lost(self, exc: TransportError) -> None:
        """Log the first failure of an outage; the attempts after it are counted, and
        logged (at debug) one by one: twice a second would flood the log."""
        if self._outage is None:
            self._outage = (time.monotonic(), 1)
            log.warning("archiver lost the broker (%s); reconnecting", exc)
        else:
            self._outage = (self._outage[0], self._outage[1] + 1)
            log.debug("archiver still cannot reach the broker (%s)", exc)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 for a browser participant; returns after the broker's PUBACK.

        Raises:
            ConnectFailed: not connected to the broker right now.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            raise ConnectFailed("the gateway is not connected to the broker")
        await client.publish(topic, payload, retain=retain, timeout=10)

    async def roster(self, cid: str, epoch: int) -> Roster | None:
        """The archived roster of ``cid`` at ``epoch`` (cached)."""
        key = (cid, epoch)
        found = self._rosters.get(key)
        if found is None:
            data = await self.store.roster(cid, epoch)
            if data is None:
                return None
            found = await self._in_thread(Roster.from_bytes, data)
            self._rosters.put(key, found)
        assert isinstance(found, Roster)
        return found

    async def bundle(self, pid: str) -> Bundle | None:
        """The newest archived bundle of ``pid`` (cached)."""
        found = self._bundles.get(pid)
        if found is None:
            data = await self.store.bundle(pid)
            if data is None:
                return None
            found = await self._in_thread(Bundle.from_bytes, data)
            self._bundles.put(pid, found)
        assert isinstance(found, Bundle)
        return found

    async def upload(
        self, cid: str, payloads: Sequence[bytes | None], pids: frozenset[str]
    ) -> Uploaded:
        """Archive envelopes a member uploads (``POST /v1/conversations/{cid}/envelopes``)
        exactly as if they had come on ``c/{cid}/msg``: the same checks, candidates,
        pending store and quotas, one commit, the live feed woken. Frames are refused
        (envelopes only); ``None`` stands for an item that was not base64.

        Raises:
            Forbidden: an envelope's sender (its index in the roster of its epoch) is
                not one of ``pids``: nothing of the request is archived.
            StorageError: the database failed.
        """
        now = time.time()
        topic = self.topics.msg(cid)
        refused: list[tuple[int, str]] = []
        work: list[_Work] = []
        for index, data in enumerate(payloads):
            reason: str | None = None
            if data is None:
                reason = "malformed"
            elif is_frame(data):
                reason = "frame"
            else:
                parsed = classify(self._topic_cache, topic, data, now)
                if isinstance(parsed, Rejected):
                    reason = parsed.reason
                else:
                    assert parsed.envelope is not None
                    reason = await self._uploader_is_sender(cid, index, parsed.envelope, pids)
                    if reason is None:
                        work.append(_Work(cid, parsed.envelope, data, now, index=index))
            if reason is not None:
                self._reject(reason, "http")
                refused.append((index, reason))
        sink = _Sink("http", refused)
        out = ArchiveBatch()
        await self._resolve(work, out, fresh=True, sink=sink)
        result = await self._commit(out)
        refused.sort()
        return Uploaded(
            archived=result.archived if result else 0,
            duplicates=result.duplicates if result else 0,
            pending=len(out.pending),
            refused=refused,
        )

    async def _uploader_is_sender(
        self, cid: str, index: int, envelope: Envelope, pids: frozenset[str]
    ) -> str | None:
        """Why an uploaded envelope is refused (``roster_unknown``, ``not_member``), or
        None; raises Forbidden when its sender is not the uploader (see ``upload``)."""
        roster = await self.roster(cid, envelope.epoch)
        if roster is None:
            return "roster_unknown"  # its sender cannot be told: the uploader tries later
        try:
            sender = roster.member_at(envelope.sender).pid
        except NotAMember:
            return "not_member"
        if sender not in pids:
            self._reject("not_sender", "http")
            raise Forbidden(
                f"envelope {index} is {sender}'s (epoch {envelope.epoch}, sender "
                f"{envelope.sender}): upload only your own"
            )
        return None

    def learn_bundle(self, bundle: Bundle) -> None:
        """Cache a bundle the API just stored (browser registration)."""
        known = self._bundles.get(bundle.pid)
        if known is None or known.created_at < bundle.created_at:
            self._bundles.put(bundle.pid, bundle)

    # -- the session -------------------------------------------------------------------

    def _subscriptions(self) -> list[tuple[str, int]]:
        t = self.topics
        msgs = t.all_msgs()
        if self.settings.share_group:
            msgs = f"$share/{self.settings.share_group}/{msgs}"
        inboxes = f"{t.prefix}/p/+/inbox"
        return [
            (t.all_rosters(), 1),
            (t.all_proposals(), 1),
            (t.all_bundles(), 1),
            (t.all_statuses(), 1),
            (inboxes, 1),
            (msgs, 1),
        ]

    async def _session(self) -> None:
        client = self._make_client()
        await client.connect()
        try:
            # Subscribe again even when the broker says the session is present: Mosquitto
            # 2.0.11 restores a session without its $share/ subscriptions (issue 14).
            self.session_present = client.session_present
            await client.subscribe(self._subscriptions())
            self._client = client
            self.connected.set()
            self.metrics.mqtt_connected.set(1)
            self.metrics.mqtt_connects.inc()
            if self._outage is not None:
                since, attempts = self._outage
                self._outage = None
                log.info(
                    "archiver back after %.1f s (%d failed attempts), subscribed again",
                    time.monotonic() - since,
                    attempts,
                )
            else:
                log.info("archiver connected as %s", self.settings.mqtt_client_id)
            self._watcher = asyncio.create_task(self._watch_routing(client))
            self._kick_publisher()  # what could not be republished before
            sweep_at = time.monotonic() + self.settings.pending_retry_s
            while True:
                batch = await self._collect(client, sweep_at)
                if batch:
                    await self._process(batch)
                    client.ack(batch)  # after the commit, in receive order (MQTT 5 §4.6)
                if time.monotonic() >= sweep_at:
                    await self._sweep()
                    sweep_at = time.monotonic() + self.settings.pending_retry_s
        finally:
            # What was read but not committed is not acknowledged: the broker redelivers.
            tasks = [t for t in (self._publisher, self._watcher) if t is not None]
            self._publisher = self._watcher = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    async def _collect(self, client: MqttClient, sweep_at: float) -> list[Publish]:
        """Up to ``batch_max`` messages: wait for the first, then at most ``batch_wait_s``
        for more — but only during a burst. A lone message after a lone message is a
        trickle (a conversation, not a flood): waiting would only delay it for every
        live reader, so it goes at once."""
        if not await client.wait(max(0.0, sweep_at - time.monotonic()) + 0.01):
            return []
        limit = self.settings.batch_max
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_wait_s
        batch = client.take(limit)
        trickle = len(batch) == 1 and self._last_batch == 1
        self._last_batch = len(batch)
        while len(batch) < limit and not trickle:
            left = deadline - loop.time()
            if left <= 0 or not await client.wait(left):
                break
            batch += client.take(limit - len(batch))
        self._last_batch = len(batch)
        self._backlog = len(batch) >= limit
        return batch

    # -- routing canaries (gateway._routing) -------------------------------------------

    async def _canary_codec(self) -> Canary:
        if self._canary is None:
            key = await self.store.secret(CANARY_SECRET, os.urandom(32))
            self._canary = Canary(key)
        return self._canary

    async def _watch_routing(self, client: MqttClient) -> None:
        """Send a canary now and every ``canary_interval_s``; when one does not come
        back in time, count it, log the first of a run, subscribe to the envelopes
        again and send the next at once; after ``_CANARY_RECONNECT_AFTER`` in a row,
        reconnect."""
        interval = self.settings.canary_interval_s
        if interval <= 0:
            return
        shared = self._subscriptions()[-1:]  # the envelopes' filter (no retained messages)
        while True:
            try:
                seen = await self._send_canary(client)
            except FieldchatError as exc:  # the database: try again at the next round
                log.warning("routing canary not checked: %s", exc)
                seen = None
            if seen is False:
                self._canary_failures += 1
                self.metrics.canary_failures.inc()
                if self._canary_failures == 1:
                    log.warning(
                        "routing canary not back within %.1f s: the broker may have dropped "
                        "the subscription to %s; subscribing again",
                        self.settings.canary_timeout_s,
                        shared[0][0],
                    )
                if self._canary_failures % _CANARY_RECONNECT_AFTER == 0:
                    log.warning("routing canary still lost: reconnecting")
                    await client.close()  # the archive loop sees it and reconnects
                    return
                try:
                    await client.subscribe(shared)
                except TransportError as exc:
                    log.warning("subscribing again failed (%s): reconnecting", exc)
                    await client.close()
                    return
                continue
            if seen and self._canary_failures:
                log.info("routing canary back after %d failures", self._canary_failures)
                self._canary_failures = 0
            await asyncio.sleep(interval)

    async def _send_canary(self, client: MqttClient) -> bool | None:
        """Publish a canary and wait for some gateway to receive it: True, False (not in
        time), None (it could not be published: the session is ending)."""
        canary = await self._canary_codec()
        timeout = self.settings.canary_timeout_s
        nonce, payload = canary.make()
        arrived = self._canary_waiting[nonce] = asyncio.Event()
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline, latest = start + timeout, start + timeout * _CANARY_BACKLOG_FACTOR
        try:
            try:
                await client.publish(self._canary_topic, payload, timeout=timeout)
            except TransportError:
                return None
            while not (arrived.is_set() or await self.store.canary_seen(nonce)):
                now = loop.time()
                if now >= deadline:
                    if not (self._backlog and now < latest):
                        return False
                    deadline = now + timeout  # draining a queue: the canary is in it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), min(_CANARY_POLL_S, deadline - now))
            self.metrics.canary_seconds.observe(loop.time() - start)
            return True
        finally:
            del self._canary_waiting[nonce]

    async def _take_canaries(self, batch: Sequence[Publish]) -> list[Publish]:
        """Handle the canaries of a batch (never archived); the rest of it."""
        canary = await self._canary_codec()
        rest: list[Publish] = []
        for m in batch:
            if m.topic != self._canary_topic:
                rest.append(m)
                continue
            nonce = canary.nonce_of(m.payload)
            if nonce is None:
                self._reject("canary")
            elif nonce in self._canary_waiting:
                self._canary_waiting[nonce].set()  # our own: no database needed
            else:
                await self.store.record_canary(nonce, time.time())  # another replica's
        return rest

    # -- processing --------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:  # noqa: ANN401
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _reject(self, reason: str, source: str = "mqtt") -> None:
        self.counters[reason] += 1
        self.metrics.reject(source, reason)

    async def _classify(self, batch: Sequence[Publish], now: float) -> list[Parsed | Rejected]:
        """Parse a batch in receive order.

        Envelopes and presence are parsed here, on the loop: a few µs each, less than a
        thread hop. Bundles, rosters and grants carry signatures checked while parsing
        (≈ 100 µs or more each): those go to the pool.
        """
        topics = self._topic_cache
        parsed: list[list[Parsed | Rejected] | None] = [
            classify_all(topics, m.topic, m.payload, now)
            if m.topic.endswith(_CHEAP_SUFFIXES)
            else None
            for m in batch
        ]
        later = [i for i, p in enumerate(parsed) if p is None]
        if later:
            done: list[Parsed | Rejected] = await self._in_thread(
                lambda: [classify(topics, batch[i].topic, batch[i].payload, now) for i in later]
            )
            for i, p in zip(later, done, strict=True):
                parsed[i] = [p]
        return [p for ps in parsed if ps is not None for p in ps]

    async def _process(self, batch: Sequence[Publish]) -> None:
        canary = self._canary_topic
        if any(m.topic == canary for m in batch):  # ≈ 40 ns a message
            batch = await self._take_canaries(batch)
        now = time.time()
        parsed = await self._classify(batch, now)
        out = ArchiveBatch()
        envelopes: list[Parsed] = []
        rosters = _Rosters()
        for p in parsed:
            if isinstance(p, Rejected):
                self._reject(p.reason)
                log.debug("rejected %s: %s", p.reason, p.detail)
            elif p.cleared:
                if p.kind is TopicKind.ROSTER and p.cid is not None:
                    await self._heal(p.cid, "the retained roster was erased")
            elif p.kind is TopicKind.MSG:
                envelopes.append(p)
            elif p.kind is TopicKind.STATUS:
                assert p.pid is not None
                self.listener.presence(p.pid, p.data)
            elif p.kind is TopicKind.BUNDLE:
                assert p.bundle is not None
                self.learn_bundle(p.bundle)
                out.bundles.append((p.bundle.pid, p.bundle.created_at, p.data))
            elif p.roster is not None:  # c/{cid}/roster, c/{cid}/propose, or an inbox
                await self._accept_roster(p.roster, p.data, _SOURCES[p.kind], out, rosters, now)
            elif p.kind is TopicKind.INBOX:
                assert p.grant is not None
                g = p.grant
                out.grants.append(
                    GrantRecord(
                        g.recipient, g.cid, g.granter, hashlib.sha256(p.data).digest(), p.data, now
                    )
                )
        work = [
            _Work(p.cid, p.envelope, p.data, now)
            for p in envelopes
            if p.envelope is not None and p.cid is not None
        ]
        await self._resolve(work, out, fresh=True)
        await self._commit(out)
        cids = self._adopted(rosters, out) | self._elsewhere
        self._elsewhere = set()
        if cids:
            cids |= await self._promote(cids)
        if cids or out.bundles:
            await self._retry_pending(cids=cids, pids={b[0] for b in out.bundles})

    def _adopted(self, rosters: _Rosters, out: ArchiveBatch) -> set[str]:
        """After a commit: tell the listener, queue the republications; the cids with a
        newly adopted roster."""
        if out.held:
            self.metrics.rosters_held.inc(len(out.held))
        if out.released:
            self.metrics.rosters_held.dec(len(out.released))
        for record in rosters.announce:
            self.listener.roster(record)
        for record in rosters.republish:
            self._republish(record.cid, record.epoch, record.data)
        return {r.cid for r in rosters.adopted}

    # -- rosters -----------------------------------------------------------------------

    async def _judge(self, roster: Roster) -> Verdict:
        """:func:`gateway._rosters.judge` against the archive (see there for Raises)."""
        cid, epoch = roster.cid, roster.epoch
        known = await self.roster(cid, epoch)
        prev = await self.roster(cid, epoch - 1) if known is None and epoch > 0 else None
        following = await self.roster(cid, epoch + 1) if known is None else None
        return judge(roster, known=known, prev=prev, following=following)

    async def _check_founding(self, roster: Roster, now: float, out: ArchiveBatch) -> None:
        """Raises: RosterRefused (``founding_quota``): its signer founded
        ``founding_max`` conversations in the last ``founding_window_s``."""
        signer = roster.signer
        since = now - self.settings.founding_window_s
        founded = await self.store.foundings(signer, since=since)
        founded += sum(1 for r in out.rosters if r.epoch == 0 and r.signer == signer)
        if founded >= self.settings.founding_max:
            raise RosterRefused(
                "founding_quota",
                f"{signer} founded {founded} conversations in the last "
                f"{self.settings.founding_window_s:.0f} s (founding_max)",
            )

    async def submit_roster(self, roster: Roster, data: bytes) -> None:
        """Archive a browser's roster before it goes out on ``c/{cid}/roster``.

        It must be the archived roster again, or found its conversation (within its
        signer's founding quota), or chain to the archived roster of the epoch before.
        Archived here, not when it comes back over MQTT, so the browser's next roster
        (epoch 1 right after it founded the conversation) finds it. The caller
        publishes it (the browser's ack follows the broker's PUBACK).

        Raises:
            RosterRefused: ``roster_conflict``, ``roster_unchained`` (the previous epoch
                is not archived: publish the chain first), ``founding_quota``.
            RosterRejected: it does not chain.
            StorageError: the database failed.
        """
        verdict = await self._judge(roster)
        if verdict is Verdict.HOLD:
            raise RosterRefused(
                "roster_unchained",
                f"epoch {roster.epoch - 1} of {roster.cid} is not archived: "
                "the roster cannot be checked against its chain",
            )
        now, out, rosters = time.time(), ArchiveBatch(), _Rosters()
        if verdict is Verdict.ADOPT and roster.epoch == 0:
            await self._check_founding(roster, now, out)
        self._take(roster, data, verdict, Source.WS, out, rosters, now)
        await self._commit(out)
        self._elsewhere |= self._adopted(rosters, out)  # the archive loop follows up

    async def _accept_roster(
        self,
        roster: Roster,
        data: bytes,
        source: Source,
        out: ArchiveBatch,
        rosters: _Rosters,
        now: float,
    ) -> None:
        """Adopt, hold or refuse a roster (``fieldchat.gateway._rosters``): never "as a base".

        A refusal is counted (and logged once per interval); a roster refused on
        ``c/{cid}/roster`` may have replaced the retained one, so the head goes out again.
        """
        cid, epoch = roster.cid, roster.epoch
        try:
            verdict = await self._judge(roster)
            if verdict is Verdict.ADOPT and epoch == 0 and source.founding_counted:
                await self._check_founding(roster, now, out)
        except FieldchatError as exc:
            self.refusals.refuse(exc.reason, f"{source} roster of {cid} epoch {epoch}: {exc}")
            if source is Source.ROSTER:
                await self._heal(cid, f"a refused roster ({exc.reason}) is on its topic")
            return
        if verdict is Verdict.HOLD:
            await self._hold(roster, data, source, out, now)
            return
        self._take(roster, data, verdict, source, out, rosters, now)
        if verdict is Verdict.KNOWN and source is Source.ROSTER:
            head = await self._head(cid)
            if head is not None and epoch < head:
                await self._heal(cid, f"the retained roster is epoch {epoch}, not {head}")
        elif verdict is Verdict.KNOWN and source.republished and epoch == await self._head(cid):
            # proposed again (its admin retries, or another gateway adopted it first): the
            # retained roster may still lack it (a republication lost with a gateway)
            rosters.republish.append(out.rosters[-1])

    def _take(
        self,
        roster: Roster,
        data: bytes,
        verdict: Verdict,
        source: Source,
        out: ArchiveBatch,
        rosters: _Rosters,
        now: float,
    ) -> None:
        """Put an adopted (or known) roster in the batch and note what follows its commit."""
        cid, epoch = roster.cid, roster.epoch
        record = RosterRecord(
            cid, epoch, roster.digest(), roster.pids, data, signer=roster.signer, archived_at=now
        )
        out.rosters.append(record)  # KNOWN too: idempotent, and it completes a failed commit
        if verdict is Verdict.ADOPT:
            self._rosters.put((cid, epoch), roster)
            self._raise_head(cid, epoch)
            rosters.adopted.append(record)
            if source.republished:
                rosters.republish.append(record)
        if self._announced.get((cid, epoch)) != record.digest:
            self._announced.put((cid, epoch), record.digest)
            rosters.announce.append(record)

    async def _hold(
        self, roster: Roster, data: bytes, source: Source, out: ArchiveBatch, now: float
    ) -> None:
        """Keep a roster whose previous epoch is not archived, within the quotas."""
        cid, digest = roster.cid, roster.digest()
        if any(h.cid == cid and h.epoch == roster.epoch and h.digest == digest for h in out.held):
            return
        mine, every = await self.store.held_counts(cid)
        mine += sum(1 for h in out.held if h.cid == cid)
        every += len(out.held)
        detail = f"{source} roster of {cid} epoch {roster.epoch} (its previous epoch is missing)"
        if mine >= self.settings.held_rosters_per_conversation_max:
            self.refusals.refuse("held_conversation_full", detail)
        elif every >= self.settings.held_rosters_max:
            self.refusals.refuse("held_full", detail)
        else:
            self.counters["held"] += 1
            out.held.append(HeldRoster(cid, roster.epoch, digest, data, source.value, now))

    async def _promote(self, cids: set[str], *, expire_before: float | None = None) -> set[str]:
        """Adopt the held rosters whose previous epoch is archived now (epoch by epoch,
        so a held chain is adopted whole); drop refused ones and, with
        ``expire_before``, those held since before it. All conversations' when ``cids``
        is empty. The cids with a newly adopted roster."""
        adopted: set[str] = set()
        for _ in range(_PROMOTE_ROUNDS):
            held = await self.store.held_rosters(cids=cids, limit=_SWEEP_LIMIT)
            if not held:
                break
            held.sort(key=lambda h: (h.cid, h.epoch, h.id or 0))
            parsed = await self._in_thread(_parse_held, held)
            out, rosters, now = ArchiveBatch(), _Rosters(), time.time()
            for h, roster in zip(held, parsed, strict=True):
                assert h.id is not None
                if isinstance(roster, FieldchatError):
                    self.refusals.refuse(roster.reason, f"held roster of {h.cid}: {roster}")
                    out.released.append(h.id)
                elif await self._promote_one(h, roster, out, rosters, now, expire_before):
                    out.released.append(h.id)
            if not out:
                break
            await self._commit(out)
            fresh = self._adopted(rosters, out)
            adopted |= fresh
            if not fresh:
                break
            cids = fresh
        return adopted

    async def _promote_one(
        self,
        held: HeldRoster,
        roster: Roster,
        out: ArchiveBatch,
        rosters: _Rosters,
        now: float,
        expire_before: float | None,
    ) -> bool:
        """Judge one held roster again; True when it leaves the held store."""
        try:
            verdict = await self._judge(roster)
        except FieldchatError as exc:
            self.refusals.refuse(exc.reason, f"held roster of {held.cid} epoch {held.epoch}")
            return True
        if verdict is Verdict.HOLD:
            if expire_before is not None and held.received_at < expire_before:
                self.refusals.refuse(
                    "roster_expired",
                    f"held roster of {held.cid} epoch {held.epoch}: its chain never arrived",
                )
                return True
            return False
        self._take(roster, held.data, verdict, Source(held.source), out, rosters, now)
        return True

    def _raise_head(self, cid: str, epoch: int) -> None:
        known = self._heads.get(cid)
        if known is None or known < epoch:
            self._heads.put(cid, epoch)

    async def _head(self, cid: str) -> int | None:
        """The newest archived epoch of ``cid`` (cached; the archive only grows)."""
        known = self._heads.get(cid)
        if known is None:
            head = await self.store.roster_head(cid)
            if head is None:
                return None
            known = head[0]
            self._raise_head(cid, known)
        assert isinstance(known, int)
        return known

    async def _heal(self, cid: str, why: str) -> None:
        """Publish the archived head of ``cid`` on its roster topic again (at most once
        per ``HEAL_INTERVAL_S`` a conversation: see ``gateway._rosters.Healer``)."""
        if not self._healer.due(cid):
            return
        head = await self.store.roster_head(cid)
        if head is None:
            return
        log.info("republishing the roster of %s (epoch %d): %s", cid, head[0], why)
        self.counters["healed"] += 1
        self._republish(cid, head[0], head[1])

    # -- republishing ------------------------------------------------------------------

    def _republish(self, cid: str, epoch: int, data: bytes) -> None:
        """Queue a roster for ``c/{cid}/roster`` (retained, QoS 1), newest epoch per cid.

        Published by a task of its own, so the archive loop never waits for a PUBACK
        (the client stops reading the socket while its inbox is full). One that fails
        goes to the back of the queue and is tried again at the next connection or
        republication, at most ``_REPUBLISH_ATTEMPTS`` times (then dropped, counted).
        """
        queued = self._outgoing.get(cid)
        if queued is not None and queued.epoch > epoch:
            return
        if queued is None and len(self._outgoing) >= _OUTGOING_MAX:
            self.refusals.refuse("republish_backlog", f"roster of {cid} epoch {epoch}")
            return
        self._outgoing[cid] = _Outgoing(epoch, data)
        self._kick_publisher()

    def _kick_publisher(self) -> None:
        if not self._outgoing or not self.connected.is_set():
            return
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_outgoing())

    async def _publish_outgoing(self) -> None:
        while self._outgoing:
            cid, item = next(iter(self._outgoing.items()))
            try:
                await self.publish(self.topics.roster(cid), item.data, retain=True)
            except TransportError as exc:
                item.attempts += 1
                if self._outgoing.get(cid) is item:
                    del self._outgoing[cid]
                    if item.attempts < _REPUBLISH_ATTEMPTS:
                        self._outgoing[cid] = item  # to the back: others are not held up
                    else:
                        self.refusals.refuse("republish_failed", f"roster of {cid}: {exc}")
                log.info("republishing the roster of %s failed (%s); later", cid, exc)
                return
            if self._outgoing.get(cid) is item:
                del self._outgoing[cid]
            self.counters["republished"] += 1
            self.metrics.rosters_republished.inc()

    async def _resolve(  # noqa: PLR0912 - the verification decision table, kept in one place
        self,
        items: Iterable[_Work],
        out: ArchiveBatch,
        *,
        fresh: bool,
        expire_before: float | None = None,
        sink: _Sink | None = None,
    ) -> None:
        """Sort envelopes into archive, pending (fresh ones only) or rejected (told to
        ``sink`` when given: an upload's answer).

        An unsigned envelope the policy allows is archived as a *candidate* of its key:
        the gateway cannot tell a member's junk from the sender's envelope, so it keeps
        every distinct one and receivers pick (AES-GCM); a signed one is the only one
        kept for its key, whatever came before it (``HistoryStore.commit``).
        """
        jobs: list[tuple[Envelope, bytes, str, bytes]] = []
        waiting: list[tuple[_Work, str]] = []
        pending_of: dict[str, Counter[tuple[int, int]]] = {}
        rosters, bundles = self._rosters, self._bundles
        for item in items:
            env = item.envelope
            # the caches first, without a coroutine per envelope (the hot path)
            roster = rosters.get((item.cid, env.epoch)) or await self.roster(item.cid, env.epoch)
            sender_pid: str | None = None
            if roster is not None:
                try:
                    sender_pid = roster.member_at(env.sender).pid
                except NotAMember:
                    self._settle(item, out, "not_member", sink)
                    continue
                if env.signature is None:
                    if roster.policy.must_sign(env.step):
                        self._settle(item, out, "unsigned", sink)
                    else:
                        self._archive(item, sender_pid, out)
                    continue
                bundle = bundles.get(sender_pid) or await self.bundle(sender_pid)
                if bundle is not None:
                    jobs.append((env, item.data, item.cid, bundle.ed25519))
                    waiting.append((item, sender_pid))
                    continue
            # roster or bundle missing: keep it
            if expire_before is not None and item.received_at < expire_before:
                self._settle(item, out, "unverifiable", sink)
            elif fresh:
                refused = await self._pending_quota(item, out, pending_of)
                if refused is not None:
                    if sink is not None:
                        sink.refused.append((item.index or 0, refused))
                    self.refusals.refuse(
                        refused,
                        f"a pending envelope of {item.cid} epoch {env.epoch} sender {env.sender}",
                        source=sink.source if sink is not None else "mqtt",
                    )
                else:
                    out.pending.append(
                        PendingEnvelope(
                            cid=item.cid,
                            epoch=env.epoch,
                            sender=env.sender,
                            data=item.data,
                            received_at=item.received_at,
                            sender_pid=sender_pid,
                        )
                    )
        if not jobs:
            return
        if len(jobs) <= _VERIFY_INLINE_MAX:
            # A live message or two: verifying here (≈ 0.1-0.2 ms each) beats two thread
            # wake-ups, which on a busy machine each wait for a time slice (ms).
            flat = verify_signatures(jobs)
        else:
            workers = self.settings.verify_workers
            size = max(1, -(-len(jobs) // workers))
            chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
            results = await asyncio.gather(*(self._in_thread(verify_signatures, c) for c in chunks))
            flat = [r for chunk in results for r in chunk]
        for (item, sender_pid), reason in zip(waiting, flat, strict=True):
            if reason is None:
                self._archive(item, sender_pid, out)
            else:
                self._settle(item, out, reason, sink)

    async def _pending_quota(
        self, item: _Work, out: ArchiveBatch, pending_of: dict[str, Counter[tuple[int, int]]]
    ) -> str | None:
        """Why a fresh envelope may not wait in the pending store, or None (counted in).

        Three quotas: ``pending_max`` for every conversation together,
        ``pending_per_conversation_max`` and ``pending_per_sender_max`` (per epoch and
        sender index), so one member cannot fill what every conversation shares.
        ``pending_of`` holds the counts of this batch's conversations, read once.
        """
        s = self.settings
        if self._pending_count + len(out.pending) >= s.pending_max:
            return "pending_full"
        counts = pending_of.get(item.cid)
        if counts is None:
            counts = pending_of[item.cid] = Counter(await self.store.pending_counts(item.cid))
        key = (item.envelope.epoch, item.envelope.sender)
        if counts.total() >= s.pending_per_conversation_max:
            return "pending_conversation_full"
        if counts[key] >= s.pending_per_sender_max:
            return "pending_sender_full"
        counts[key] += 1
        return None

    def _archive(self, item: _Work, sender_pid: str, out: ArchiveBatch) -> None:
        env = item.envelope
        out.envelopes.append(
            NewEnvelope(
                cid=item.cid,
                epoch=env.epoch,
                sender=env.sender,
                sender_pid=sender_pid,
                chain=env.chain,
                step=env.step,
                data=item.data,
                received_at=item.received_at,
                signed=env.signature is not None,  # verified by now, or allowed unsigned
            )
        )
        if item.pending_id is not None:
            out.resolved.append(item.pending_id)

    def _settle(
        self, item: _Work, out: ArchiveBatch, reason: str, sink: _Sink | None = None
    ) -> None:
        if sink is None:
            self._reject(reason)
        else:
            self._reject(reason, sink.source)
            sink.refused.append((item.index or 0, reason))
        if item.pending_id is not None:
            out.resolved.append(item.pending_id)

    async def _commit(self, out: ArchiveBatch) -> ArchiveResult | None:
        if not out:
            return None
        result = await self.store.commit(out)
        done = time.time()
        if self.tracer is not None:
            for e in out.envelopes:
                self.tracer.span(
                    "archive",
                    e.cid,
                    e.data,
                    kind="consumer",
                    start_ns=int(e.received_at * 1e9),
                    attributes={"fieldchat.archive.batch": len(out.envelopes)},
                )
        m = self.metrics
        m.archived.inc(result.archived)
        m.duplicates.inc(result.duplicates)
        m.rosters.inc(result.rosters)
        m.grants.inc(result.grants)
        m.batch_size.observe(len(out.envelopes) + len(out.pending))
        if out.envelopes:  # once per commit: the batch's oldest envelope (cheap, and the max)
            m.archive_lag.observe(max(0.0, done - min(e.received_at for e in out.envelopes)))
        self.counters["archived"] += result.archived
        self.counters["duplicate"] += result.duplicates
        self._pending_count = max(0, self._pending_count + len(out.pending) - len(out.resolved))
        m.pending.set(self._pending_count)
        if result.max_seq is not None or result.grants:
            self.listener.committed(result.max_seq, result.grants)
        return result

    async def _retry_pending(self, *, cids: set[str], pids: set[str]) -> None:
        if self._pending_count == 0:
            return
        waiting = await self.store.pending(cids=cids, pids=pids, limit=_SWEEP_LIMIT)
        if waiting:
            out = ArchiveBatch()
            await self._resolve(map(_Work.from_pending, waiting), out, fresh=False)
            await self._commit(out)

    async def _sweep(self) -> None:
        """Retry every held roster and pending envelope (another gateway may have
        archived what they wait for) and drop those older than ``pending_ttl_s``."""
        await self._promote(set(), expire_before=time.time() - self.settings.pending_ttl_s)
        self.metrics.rosters_held.set((await self.store.held_counts(""))[1])
        self._pending_count = await self.store.pending_count()
        self.metrics.pending.set(self._pending_count)
        if not self._pending_count:
            return
        waiting = await self.store.pending(limit=_SWEEP_LIMIT)
        out = ArchiveBatch()
        await self._resolve(
            map(_Work.from_pending, waiting),
            out,
            fresh=False,
            expire_before=time.time() - self.settings.pending_ttl_s,
        )
        await self._commit(out)


@dataclass(frozen=True, slots=True)
class _Work:
    """One envelope on its way to the archive: fresh from MQTT or a pending row."""

    cid: str
    envelope: Envelope
    data: bytes
    received_at: float
    pending_id: int | None = None
    index: int | None = None  # its position in an upload (``Archiver.upload``)

    @classmethod
    def from_pending(cls, row: PendingEnvelope) -> _Work:
        return cls(row.cid, Envelope.from_bytes(row.data), row.data, row.received_at, row.id)


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What ``Archiver.upload`` did: new rows, rows already archived, envelopes stored
    as pending (their sender's bundle is missing), and ``(index, reason)`` refusals."""

    archived: int
    duplicates: int
    pending: int
    refused: list[tuple[int, str]]


@dataclass(frozen=True, slots=True)
class _Sink:
    """Where ``_resolve`` tells an upload's refusals, and the metrics source to count."""

    source: str
    refused: list[tuple[int, str]]


@dataclass(slots=True)
class _Outgoing:
    """A roster waiting to go out on ``c/{cid}/roster``."""

    epoch: int
    data: bytes
    attempts: int = 0


@dataclass(slots=True)
class _Rosters:
    """What one batch did with rosters, acted on after its commit."""

    adopted: list[RosterRecord] = field(default_factory=list)
    announce: list[RosterRecord] = field(default_factory=list)  # to the listener (the hub)
    republish: list[RosterRecord] = field(default_factory=list)  # verified here: retain them


def _parse_held(held: list[HeldRoster]) -> list[Roster | FieldchatError]:
    """Decode held rosters (their signatures again: in the pool)."""
    out: list[Roster | FieldchatError] = []
    for h in held:
        try:
            out.append(Roster.from_bytes(h.data))
        except FieldchatError as exc:
            out.append(exc)
    return out
