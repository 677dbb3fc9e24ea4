"""The archiver: an MQTT client that stores every envelope, exactly once.

Delivery contract (MQTT 5 §4.3.2, §4.6):

* Persistent session (``clean_start=False`` and a session expiry), QoS 1, so the
  broker queues while we are away and redelivers what we did not acknowledge.
* **PUBACK after commit.** Our own client (``gateway._mqtt``, which says why not
  aiomqtt) acknowledges only when told: after the batch is committed, in receive order
  as MQTT 5 §4.6 asks. A crash between commit and ack means a redelivery, which the
  unique key absorbs; a crash before the commit loses nothing because nothing was
  acknowledged.
* Our Receive Maximum bounds the unacknowledged messages in flight, hence our
  memory: the broker stops sending until we acknowledge.

Envelopes whose roster (of their epoch) or sender bundle has not arrived yet are
stored as *pending* and acknowledged; they are verified and moved to the archive
when the roster or bundle arrives (immediately, or by the periodic sweep when another
gateway archived it), and dropped as ``unverifiable`` after ``pending_ttl_s``.

With ``share_group`` set, envelopes come through ``$share/{group}/…/c/+/msg`` so
gateways split them; rosters, bundles, presence and grants are plain subscriptions,
every gateway needs all of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gateway._metrics import Metrics
from gateway._mqtt import MqttClient, Publish
from gateway._settings import GatewaySettings
from gateway._store import (
    ArchiveBatch,
    GrantRecord,
    HistoryStore,
    NewEnvelope,
    PendingEnvelope,
    RosterRecord,
)
from gateway._verify import (
    Parsed,
    Rejected,
    TopicCache,
    classify,
    classify_all,
    verify_signatures,
)
from schemas import Bundle, Envelope, Roster, TopicKind, Topics, tracing, verify_roster_chain
from schemas.errors import (
    ConfigError,
    ConnectFailed,
    FieldchatError,
    NotAMember,
    TransportError,
)

__all__ = ["ArchiveListener", "Archiver", "MqttFactory", "mqtt_factory"]

log = logging.getLogger("fieldchat.gateway.archiver")

MqttFactory = Callable[[], MqttClient]
_CACHE_MAX = 20_000
_RECONNECT_MAX_S = 10.0
_SWEEP_LIMIT = 1000
_CHEAP_SUFFIXES = ("/msg", "/status")  # parsed on the loop (see ``_classify``)
_VERIFY_INLINE_MAX = 2  # envelopes verified on the loop rather than in the pool


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
        self.connected = asyncio.Event()
        self.tracer = tracing.tracer("gateway")  # docs/tracing.md; None when off

    # -- public ------------------------------------------------------------------------

    async def run(self) -> None:
        """Archive until cancelled, reconnecting with backoff after broker failures."""
        delay = 0.2
        self._pending_count = await self.store.pending_count()
        self.metrics.pending.set(self._pending_count)
        while True:
            try:
                await self._session()
            except TransportError as exc:
                log.warning("archive failed (%s); reconnecting in %.1fs", exc, delay)
            except Exception:  # a long-running loop: log and keep serving (STYLE.md)
                log.exception("archiver failed; reconnecting in %.1fs", delay)
            finally:
                if self.connected.is_set():
                    delay = 0.2  # it worked for a while: retry promptly
                self._client = None
                self.connected.clear()
                self.metrics.mqtt_connected.set(0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_S)

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
            (t.all_bundles(), 1),
            (t.all_statuses(), 1),
            (inboxes, 1),
            (msgs, 1),
        ]

    async def _session(self) -> None:
        client = self._make_client()
        await client.connect()
        try:
            await client.subscribe(self._subscriptions())
            self._client = client
            self.connected.set()
            self.metrics.mqtt_connected.set(1)
            log.info("archiver connected as %s", self.settings.mqtt_client_id)
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
        return batch

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
        now = time.time()
        parsed = await self._classify(batch, now)
        out = ArchiveBatch()
        envelopes: list[Parsed] = []
        new_rosters: list[RosterRecord] = []
        for p in parsed:
            if isinstance(p, Rejected):
                self._reject(p.reason)
                log.debug("rejected %s: %s", p.reason, p.detail)
            elif p.cleared:
                continue
            elif p.kind is TopicKind.MSG:
                envelopes.append(p)
            elif p.kind is TopicKind.STATUS:
                assert p.pid is not None
                self.listener.presence(p.pid, p.data)
            elif p.kind is TopicKind.BUNDLE:
                assert p.bundle is not None
                self.learn_bundle(p.bundle)
                out.bundles.append((p.bundle.pid, p.bundle.created_at, p.data))
            elif p.kind is TopicKind.ROSTER:
                assert p.roster is not None
                record = await self._accept_roster(p.roster, p.data)
                if record is not None:
                    out.rosters.append(record)
                    new_rosters.append(record)
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
        for record in new_rosters:
            self.listener.roster(record)
        if out.rosters or out.bundles:
            await self._retry_pending(
                cids={r.cid for r in out.rosters}, pids={b[0] for b in out.bundles}
            )

    async def _accept_roster(self, roster: Roster, data: bytes) -> RosterRecord | None:
        """Check a roster against its archived neighbours; ``None`` when refused.

        Chains are verified where the previous epoch is archived; a later epoch seen
        without its predecessor (the gateway joined late, the broker retains only the
        newest roster) is accepted as a base, as members do (PROTOCOL.md §5.2).
        """
        digest = roster.digest()
        record = RosterRecord(roster.cid, roster.epoch, digest, roster.pids, data)
        known = await self.roster(roster.cid, roster.epoch)
        if known is not None:
            if known.digest() != digest:
                self._reject("roster_conflict")
                return None
            return record  # archived already (by us, or another gateway): still news here
        try:
            if roster.epoch == 0:
                verify_roster_chain(roster, None)
            else:
                prev = await self.roster(roster.cid, roster.epoch - 1)
                if prev is not None:
                    verify_roster_chain(roster, prev)
            nxt = await self.roster(roster.cid, roster.epoch + 1)
            if nxt is not None and nxt.prev != digest:
                self._reject("roster")
                return None
        except FieldchatError as exc:
            self._reject(exc.reason)
            return None
        self._rosters.put((roster.cid, roster.epoch), roster)
        return record

    async def _resolve(  # noqa: PLR0912 - the verification decision table, kept in one place
        self,
        items: Iterable[_Work],
        out: ArchiveBatch,
        *,
        fresh: bool,
        expire_before: float | None = None,
    ) -> None:
        """Sort envelopes into archive, pending (fresh ones only) or rejected."""
        jobs: list[tuple[Envelope, bytes, str, bytes]] = []
        waiting: list[tuple[_Work, str]] = []
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
                    self._settle(item, out, "not_member")
                    continue
                if env.signature is None:
                    if roster.policy.must_sign(env.step):
                        self._settle(item, out, "unsigned")
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
                self._settle(item, out, "unverifiable")
            elif fresh:
                if self._pending_count + len(out.pending) >= self.settings.pending_max:
                    self._reject("pending_full")
                    log.warning(
                        "pending store full (%d); refusing an envelope", self.settings.pending_max
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
                self._settle(item, out, reason)

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
            )
        )
        if item.pending_id is not None:
            out.resolved.append(item.pending_id)

    def _settle(self, item: _Work, out: ArchiveBatch, reason: str) -> None:
        self._reject(reason)
        if item.pending_id is not None:
            out.resolved.append(item.pending_id)

    async def _commit(self, out: ArchiveBatch) -> None:
        if not out:
            return
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

    async def _retry_pending(self, *, cids: set[str], pids: set[str]) -> None:
        if self._pending_count == 0:
            return
        waiting = await self.store.pending(cids=cids, pids=pids, limit=_SWEEP_LIMIT)
        if waiting:
            out = ArchiveBatch()
            await self._resolve(map(_Work.from_pending, waiting), out, fresh=False)
            await self._commit(out)

    async def _sweep(self) -> None:
        """Retry every pending envelope (another gateway may have archived its roster)
        and drop those older than ``pending_ttl_s``."""
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

    @classmethod
    def from_pending(cls, row: PendingEnvelope) -> _Work:
        return cls(row.cid, Envelope.from_bytes(row.data), row.data, row.received_at, row.id)
