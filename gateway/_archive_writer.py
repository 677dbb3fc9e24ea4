"""The archive's one writer: commits a batch, counts what it did and what was refused,
and tells the live side (``ArchiveListener``, the WebSocket hub) what is new."""

from __future__ import annotations

import time
from collections import Counter

from fieldchat.gateway._metrics import GatewayMetrics, RejectSource
from fieldchat.gateway._store import ArchiveBatch, ArchiveResult, HistoryStore, RosterRecord
from fieldchat.schemas.tracing import Tracer

__all__ = ["ArchiveListener", "ArchiveWriter"]


class ArchiveListener:
    """What the archiver tells the live side (the WebSocket hub). No-ops by default."""

    def committed(self, max_seq: int | None, grants: int) -> None:
        """New envelopes up to ``max_seq`` and/or ``grants`` new grants are committed."""

    def roster(self, record: RosterRecord) -> None:
        """A roster was archived."""

    def presence(self, pid: str, payload: bytes) -> None:
        """A participant's retained status changed."""


class ArchiveWriter:
    """Commits archive batches (``HistoryStore.commit``) and keeps their accounts:
    ``counters`` (by outcome and refusal reason), the metrics, the pending count,
    tracing spans."""

    def __init__(
        self,
        store: HistoryStore,
        metrics: GatewayMetrics,
        listener: ArchiveListener,
        counters: Counter[str],
        tracer: Tracer | None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.listener = listener
        self.counters = counters
        self.tracer = tracer
        self.pending_count = 0  # envelopes in the pending store (as this gateway counts)

    def reject(self, reason: str, source: RejectSource = RejectSource.MQTT) -> None:
        """Count one refused message (``counters`` and ``rejected_total``)."""
        self.counters[reason] += 1
        self.metrics.reject(source, reason)

    async def count_pending(self) -> int:
        """Read the pending store's size again (another gateway may have changed it)."""
        self.pending_count = await self.store.pending_count()
        self.metrics.pending.set(self.pending_count)
        return self.pending_count

    async def commit(self, out: ArchiveBatch) -> ArchiveResult | None:
        """Write ``out`` in one transaction (None when it is empty).

        Raises:
            StorageError: nothing was written.
        """
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
        self.pending_count = max(0, self.pending_count + len(out.pending) - len(out.resolved))
        m.pending.set(self.pending_count)
        if result.max_seq is not None or result.grants:
            self.listener.committed(result.max_seq, result.grants)
        return result
