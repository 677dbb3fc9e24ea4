"""The envelope sorter: puts each envelope in the archive batch, the pending store, or
refuses it, by the rules of docs/gateway.md ("Archive").

The roster of the envelope's epoch maps the header's sender index to a pid; the pid's
bundle gives the Ed25519 key; signed envelopes must verify (in the verify pool, or on
the loop for one or two); unsigned ones are accepted only where
``roster.policy.must_sign(step)`` is false. An envelope whose roster or sender bundle
has not been archived yet waits in the pending store, within three quotas, until the
sweep or the arrival of what it waits for settles it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from fieldchat.gateway._archive_cache import ArchiveCache, VerifyPool
from fieldchat.gateway._archive_writer import ArchiveWriter
from fieldchat.gateway._errors import Forbidden
from fieldchat.gateway._metrics import RejectSource
from fieldchat.gateway._quota import RefusalLog
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._store import ArchiveBatch, NewEnvelope, PendingEnvelope
from fieldchat.gateway._verify import Rejected, TopicCache, classify, verify_signatures
from fieldchat.schemas import Envelope, Topics
from fieldchat.schemas.errors import NotAMember
from fieldchat.schemas.frame import is_frame

__all__ = ["EnvelopeSorter", "Uploaded", "Work"]

SWEEP_LIMIT = 1000  # pending envelopes read per retry
VERIFY_INLINE_MAX = 2  # envelopes verified on the loop rather than in the pool


@dataclass(frozen=True, slots=True)
class Work:
    """One envelope on its way to the archive: fresh from MQTT or a pending row."""

    cid: str
    envelope: Envelope
    data: bytes
    received_at: float
    pending_id: int | None = None
    index: int | None = None  # its position in an upload (``EnvelopeSorter.upload``)

    @classmethod
    def from_pending(cls, row: PendingEnvelope) -> Work:
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
    """Where ``sort`` tells an upload's refusals, and the metrics source to count."""

    source: RejectSource
    refused: list[tuple[int, str]]


class EnvelopeSorter:
    """Sorts envelopes (from MQTT, an upload or the pending store) into a batch."""

    def __init__(
        self,
        settings: GatewaySettings,
        topics: Topics,
        writer: ArchiveWriter,
        cache: ArchiveCache,
        pool: VerifyPool,
        refusals: RefusalLog,
    ) -> None:
        self.settings = settings
        self._topics = topics
        self._topic_cache = TopicCache(topics)
        self._writer = writer
        self._cache = cache
        self._pool = pool
        self._refusals = refusals

    async def upload(
        self, cid: str, payloads: Sequence[bytes | None], pids: frozenset[str]
    ) -> Uploaded:
        """Archive envelopes a member uploads (see ``Archiver.upload``).

        Raises:
            Forbidden: an envelope's sender is not one of ``pids``: nothing is archived.
            StorageError: the database failed.
        """
        now = time.time()
        topic = self._topics.msg(cid)
        refused: list[tuple[int, str]] = []
        work: list[Work] = []
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
                        work.append(Work(cid, parsed.envelope, data, now, index=index))
            if reason is not None:
                self._writer.reject(reason, RejectSource.HTTP)
                refused.append((index, reason))
        sink = _Sink(RejectSource.HTTP, refused)
        out = ArchiveBatch()
        await self.sort(work, out, fresh=True, sink=sink)
        result = await self._writer.commit(out)
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
        roster = await self._cache.roster(cid, envelope.epoch)
        if roster is None:
            return "roster_unknown"  # its sender cannot be told: the uploader tries later
        try:
            sender = roster.member_at(envelope.sender).pid
        except NotAMember:
            return "not_member"
        if sender not in pids:
            self._writer.reject("not_sender", RejectSource.HTTP)
            raise Forbidden(
                f"envelope {index} is {sender}'s (epoch {envelope.epoch}, sender "
                f"{envelope.sender}): upload only your own"
            )
        return None

    async def sort(  # noqa: PLR0912 - the verification decision table, kept in one place
        self,
        items: Iterable[Work],
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
        waiting: list[tuple[Work, str]] = []
        pending_of: dict[str, Counter[tuple[int, int]]] = {}
        cache = self._cache
        rosters, bundles = cache.rosters, cache.bundles
        for item in items:
            env = item.envelope
            # the caches first, without a coroutine per envelope (the hot path)
            roster = rosters.get((item.cid, env.epoch)) or await cache.roster(item.cid, env.epoch)
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
                bundle = bundles.get(sender_pid) or await cache.bundle(sender_pid)
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
                    self._refusals.refuse(
                        refused,
                        f"a pending envelope of {item.cid} epoch {env.epoch} sender {env.sender}",
                        source=sink.source if sink is not None else RejectSource.MQTT,
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
        if len(jobs) <= VERIFY_INLINE_MAX:
            # A live message or two: verifying here (≈ 0.1-0.2 ms each) beats two thread
            # wake-ups, which on a busy machine each wait for a time slice (ms).
            flat = verify_signatures(jobs)
        else:
            workers = self._pool.workers
            size = max(1, -(-len(jobs) // workers))
            chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
            results = await asyncio.gather(*(self._pool.run(verify_signatures, c) for c in chunks))
            flat = [r for chunk in results for r in chunk]
        for (item, sender_pid), reason in zip(waiting, flat, strict=True):
            if reason is None:
                self._archive(item, sender_pid, out)
            else:
                self._settle(item, out, reason, sink)

    async def _pending_quota(
        self, item: Work, out: ArchiveBatch, pending_of: dict[str, Counter[tuple[int, int]]]
    ) -> str | None:
        """Why a fresh envelope may not wait in the pending store, or None (counted in).

        Three quotas: ``pending_max`` for every conversation together,
        ``pending_per_conversation_max`` and ``pending_per_sender_max`` (per epoch and
        sender index), so one member cannot fill what every conversation shares.
        ``pending_of`` holds the counts of this batch's conversations, read once.
        """
        s = self.settings
        if self._writer.pending_count + len(out.pending) >= s.pending_max:
            return "pending_full"
        counts = pending_of.get(item.cid)
        if counts is None:
            counts = Counter(await self._writer.store.pending_counts(item.cid))
            pending_of[item.cid] = counts
        key = (item.envelope.epoch, item.envelope.sender)
        if counts.total() >= s.pending_per_conversation_max:
            return "pending_conversation_full"
        if counts[key] >= s.pending_per_sender_max:
            return "pending_sender_full"
        counts[key] += 1
        return None

    def _archive(self, item: Work, sender_pid: str, out: ArchiveBatch) -> None:
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

    def _settle(self, item: Work, out: ArchiveBatch, reason: str, sink: _Sink | None) -> None:
        if sink is None:
            self._writer.reject(reason)
        else:
            self._writer.reject(reason, sink.source)
            sink.refused.append((item.index or 0, reason))
        if item.pending_id is not None:
            out.resolved.append(item.pending_id)

    async def retry_pending(
        self,
        *,
        cids: Collection[str] = (),
        pids: Collection[str] = (),
        expire_before: float | None = None,
    ) -> None:
        """Sort pending envelopes again: of ``cids`` or senders ``pids``, or every one
        (the sweep, which drops those received before ``expire_before``)."""
        if self._writer.pending_count == 0:
            return
        waiting = await self._writer.store.pending(cids=cids, pids=pids, limit=SWEEP_LIMIT)
        if waiting:
            out = ArchiveBatch()
            await self.sort(
                map(Work.from_pending, waiting), out, fresh=False, expire_before=expire_before
            )
            await self._writer.commit(out)
