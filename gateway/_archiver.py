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

:class:`Archiver` is the intake: it holds the session, collects batches, parses them
and hands each part to the component with that job, then acknowledges:

* ``gateway._sorter.EnvelopeSorter``: envelopes into the archive, the pending store
  (their roster or sender bundle has not arrived yet) or refused;
* ``gateway._roster_keeper.RosterKeeper``: rosters adopted, held or refused by their
  chain, and the broker's retained rosters kept right;
* ``gateway._archive_writer.ArchiveWriter``: the commit and its accounts;
* ``gateway._archive_cache.ArchiveCache``: parsed rosters and bundles;
* ``gateway._publisher``: browsers' publications and the republished rosters;
* ``gateway._canary_watch.CanaryWatch``: routing canaries.

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
import hashlib
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence

from fieldchat.gateway._archive_cache import ArchiveCache, VerifyPool
from fieldchat.gateway._archive_writer import ArchiveListener, ArchiveWriter
from fieldchat.gateway._canary_watch import CanaryWatch
from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._mqtt import Delivered, MqttClient
from fieldchat.gateway._publisher import BrokerPublisher, RosterRepublisher
from fieldchat.gateway._quota import RefusalLog
from fieldchat.gateway._roster_keeper import RosterKeeper, RosterNotes
from fieldchat.gateway._rosters import Source
from fieldchat.gateway._routing import RECONNECT_REFUSED_S, Backoff
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._sorter import EnvelopeSorter, Uploaded, Work
from fieldchat.gateway._store import ArchiveBatch, GrantRecord, HistoryStore
from fieldchat.gateway._verify import Parsed, Rejected, TopicCache, classify, classify_all
from fieldchat.schemas import Bundle, Roster, TopicKind, Topics, tracing
from fieldchat.schemas.errors import ConfigError, NotAuthorized, TransportError

__all__ = ["ArchiveListener", "Archiver", "MqttFactory", "Uploaded", "mqtt_factory"]

log = logging.getLogger("fieldchat.gateway.archiver")

MqttFactory = Callable[[], MqttClient]
_CHEAP_SUFFIXES = ("/msg", "/status")  # parsed on the loop (see ``_classify``)
_SOURCES = {
    TopicKind.ROSTER: Source.ROSTER,
    TopicKind.PROPOSE: Source.PROPOSE,
    TopicKind.INBOX: Source.INBOX,
}


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


def _grant_record(p: Parsed, now: float) -> GrantRecord:
    """An inbox payload kept for a browser that is offline: a grant, or an epoch secret's
    delivery (PROTOCOL.md §5.3: unsigned, no granter; its recipient is the inbox's)."""
    digest = hashlib.sha256(p.data).digest()
    if p.delivery is not None:
        assert p.pid is not None
        return GrantRecord(p.pid, p.delivery.cid, "", digest, p.data, now)
    assert p.grant is not None
    g = p.grant
    return GrantRecord(g.recipient, g.cid, g.granter, digest, p.data, now)


class Archiver:
    """Subscribes, sorts, batches, commits, acknowledges; reconnects forever.

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
        metrics: GatewayMetrics,
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
        self.tracer = tracing.tracer("gateway")  # docs/tracing.md; None when off
        self.refusals = RefusalLog(metrics)
        self._make_client = mqtt or mqtt_factory(settings)
        self._pool = VerifyPool(settings.verify_workers)
        self._cache = ArchiveCache(store, self._pool)
        self._writer = ArchiveWriter(store, metrics, self.listener, self.counters, self.tracer)
        self._publisher = BrokerPublisher()
        self.connected = self._publisher.connected
        self._republisher = RosterRepublisher(
            self._publisher, self.topics, self.refusals, self.counters, metrics
        )
        self._rosters = RosterKeeper(
            settings, self._writer, self._cache, self._pool, self._republisher, self.refusals
        )
        self._sorter = EnvelopeSorter(
            settings, self.topics, self._writer, self._cache, self._pool, self.refusals
        )
        self._canaries = CanaryWatch(
            settings,
            store,
            metrics,
            self.topics,
            draining=lambda: self._backlog,
            refuse=self._writer.reject,
        )
        self._last_batch = 0
        self._backlog = False  # the last batch was full: draining a queue
        self.session_present: bool | None = None  # what the broker said at the last CONNECT
        self._watcher: asyncio.Task[None] | None = None
        self._outage: tuple[float, int] | None = None  # (since, failed attempts)

    # -- public ------------------------------------------------------------------------

    async def run(self) -> None:
        """Archive until cancelled, reconnecting after broker failures: at once, then
        at most every ``RECONNECT_MAX_S`` (``gateway._routing.Backoff``; why there)."""
        backoff = Backoff()
        await self._writer.count_pending()
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
                self._publisher.detach()
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
        self._pool.close()

    @property
    def _client(self) -> MqttClient | None:
        """The current connection (tests reach through it to break a subscription)."""
        return self._publisher.client

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 for a browser participant; returns after the broker's PUBACK.

        Raises:
            ConnectFailed: not connected to the broker right now.
        """
        await self._publisher.publish(topic, payload, retain=retain)

    async def roster(self, cid: str, epoch: int) -> Roster | None:
        """The archived roster of ``cid`` at ``epoch`` (cached)."""
        return await self._cache.roster(cid, epoch)

    async def bundle(self, pid: str) -> Bundle | None:
        """The newest archived bundle of ``pid`` (cached)."""
        return await self._cache.bundle(pid)

    def learn_bundle(self, bundle: Bundle) -> None:
        """Cache a bundle the API just stored (browser registration)."""
        self._cache.learn_bundle(bundle)

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
        return await self._sorter.upload(cid, payloads, pids)

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
        await self._rosters.submit(roster, data)

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
            self._publisher.attach(client)
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
            # the envelopes' filter: the canaries' route (no retained messages)
            shared = self._subscriptions()[-1:]
            self._watcher = asyncio.create_task(self._canaries.watch(client, shared))
            self._republisher.kick()  # what could not be republished before
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
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                watcher.cancel()
            await asyncio.gather(
                self._republisher.stop(),
                *([watcher] if watcher is not None else []),
                return_exceptions=True,
            )
            await client.close()

    async def _collect(self, client: MqttClient, sweep_at: float) -> list[Delivered]:
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

    # -- processing --------------------------------------------------------------------

    async def _classify(self, batch: Sequence[Delivered], now: float) -> list[Parsed | Rejected]:
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
            done: list[Parsed | Rejected] = await self._pool.run(
                lambda: [classify(topics, batch[i].topic, batch[i].payload, now) for i in later]
            )
            for i, p in zip(later, done, strict=True):
                parsed[i] = [p]
        return [p for ps in parsed if ps is not None for p in ps]

    async def _process(self, batch: Sequence[Delivered]) -> None:
        canary = self._canaries.topic
        if any(m.topic == canary for m in batch):  # ≈ 40 ns a message
            batch = await self._canaries.take(batch)
        now = time.time()
        parsed = await self._classify(batch, now)
        out = ArchiveBatch()
        envelopes: list[Parsed] = []
        notes = RosterNotes()
        for p in parsed:
            if isinstance(p, Rejected):
                self._writer.reject(p.reason)
                log.debug("rejected %s: %s", p.reason, p.detail)
            elif p.cleared:
                if p.kind is TopicKind.ROSTER and p.cid is not None:
                    await self._rosters.heal(p.cid, "the retained roster was erased")
            elif p.kind is TopicKind.MSG:
                envelopes.append(p)
            elif p.kind is TopicKind.STATUS:
                assert p.pid is not None
                self.listener.presence(p.pid, p.data)
            elif p.kind is TopicKind.BUNDLE:
                assert p.bundle is not None
                self._cache.learn_bundle(p.bundle)
                out.bundles.append((p.bundle.pid, p.bundle.created_at, p.data))
            elif p.roster is not None:  # c/{cid}/roster, c/{cid}/propose, or an inbox
                await self._rosters.accept(p.roster, p.data, _SOURCES[p.kind], out, notes, now)
            elif p.kind is TopicKind.INBOX:
                out.grants.append(_grant_record(p, now))
        work = [
            Work(p.cid, p.envelope, p.data, now)
            for p in envelopes
            if p.envelope is not None and p.cid is not None
        ]
        await self._sorter.sort(work, out, fresh=True)
        await self._writer.commit(out)
        cids = self._rosters.committed(notes, out) | self._rosters.elsewhere
        self._rosters.elsewhere = set()
        if cids:
            cids |= await self._rosters.promote(cids)
        if cids or out.bundles:
            await self._sorter.retry_pending(cids=cids, pids={b[0] for b in out.bundles})

    async def _sweep(self) -> None:
        """Retry every held roster and pending envelope (another gateway may have
        archived what they wait for) and drop those older than ``pending_ttl_s``."""
        await self._rosters.promote(set(), expire_before=time.time() - self.settings.pending_ttl_s)
        await self._rosters.count_held()
        if await self._writer.count_pending():
            await self._sorter.retry_pending(
                expire_before=time.time() - self.settings.pending_ttl_s
            )
