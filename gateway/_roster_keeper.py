"""The roster keeper: adopts, holds or refuses every roster the gateway sees, by the
chain rules of ``gateway._rosters``, and keeps the broker's retained rosters right.

Rosters come from ``c/+/roster``, ``c/+/propose`` (an admin's submission), inboxes
(the earlier rosters of a chain, sent to a new member) and browsers. One is adopted
only when it chains to the archived epoch before it; one whose predecessor is missing
is held (``held_rosters``, within quotas) until it arrives. A roster adopted from
``propose`` is published, retained, on ``c/{cid}/roster``: on Mosquitto and NATS the
gateway is the verifier that writes it. When the broker shows an older, refused or
empty retained roster there, the keeper publishes the archived head again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from fieldchat.gateway._archive_cache import ArchiveCache, Lru, VerifyPool
from fieldchat.gateway._archive_writer import ArchiveListener, ArchiveWriter
from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._publisher import RosterRepublisher
from fieldchat.gateway._quota import RefusalLog
from fieldchat.gateway._rosters import Healer, RosterRefused, Source, Verdict, judge
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._store import ArchiveBatch, HeldRoster, HistoryStore, RosterRecord
from fieldchat.schemas import Roster
from fieldchat.schemas.errors import FieldchatError

__all__ = ["RosterKeeper", "RosterNotes"]

log = logging.getLogger("fieldchat.gateway.archiver")

SWEEP_LIMIT = 1000  # held rosters read per round
PROMOTE_ROUNDS = 16  # held-roster adoption rounds per call (each adopts at least one)


@dataclass(slots=True)
class RosterNotes:
    """What one batch did with rosters, acted on after its commit."""

    adopted: list[RosterRecord] = field(default_factory=list)
    announce: list[RosterRecord] = field(default_factory=list)  # to the listener (the hub)
    republish: list[RosterRecord] = field(default_factory=list)  # verified here: retain them


class RosterKeeper:
    """Judges rosters against the archive and puts the verdict in the batch."""

    def __init__(
        self,
        settings: GatewaySettings,
        writer: ArchiveWriter,
        cache: ArchiveCache,
        pool: VerifyPool,
        republisher: RosterRepublisher,
        refusals: RefusalLog,
    ) -> None:
        self.settings = settings
        self._writer = writer
        self._cache = cache
        self._pool = pool
        self._republisher = republisher
        self._refusals = refusals
        self._healer = Healer()
        self._announced: Lru[tuple[str, int], bytes] = Lru()  # told to the listener
        # cids whose roster was adopted outside the archive loop (a browser's): the
        # loop adopts the held rosters and pending envelopes that waited for it
        self.elsewhere: set[str] = set()

    @property
    def _store(self) -> HistoryStore:
        return self._writer.store

    @property
    def _metrics(self) -> GatewayMetrics:
        return self._writer.metrics

    @property
    def _listener(self) -> ArchiveListener:
        return self._writer.listener

    @property
    def _counters(self) -> Counter[str]:
        return self._writer.counters

    async def _judge(self, roster: Roster) -> Verdict:
        """:func:`gateway._rosters.judge` against the archive (see there for Raises)."""
        cid, epoch = roster.cid, roster.epoch
        known = await self._cache.roster(cid, epoch)
        prev = await self._cache.roster(cid, epoch - 1) if known is None and epoch > 0 else None
        following = await self._cache.roster(cid, epoch + 1) if known is None else None
        return judge(roster, known=known, prev=prev, following=following)

    async def _check_founding(self, roster: Roster, now: float, out: ArchiveBatch) -> None:
        """Raises: RosterRefused (``founding_quota``): its signer founded
        ``founding_max`` conversations in the last ``founding_window_s``."""
        signer = roster.signer
        since = now - self.settings.founding_window_s
        founded = await self._store.foundings(signer, since=since)
        founded += sum(1 for r in out.rosters if r.epoch == 0 and r.signer == signer)
        if founded >= self.settings.founding_max:
            raise RosterRefused(
                "founding_quota",
                f"{signer} founded {founded} conversations in the last "
                f"{self.settings.founding_window_s:.0f} s (founding_max)",
            )

    async def submit(self, roster: Roster, data: bytes) -> None:
        """Archive a browser's roster (see ``Archiver.submit_roster``).

        Raises:
            RosterRefused: ``roster_conflict``, ``roster_unchained``, ``founding_quota``.
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
        now, out, notes = time.time(), ArchiveBatch(), RosterNotes()
        if verdict is Verdict.ADOPT and roster.epoch == 0:
            await self._check_founding(roster, now, out)
        self._take(roster, data, verdict, Source.WS, out, notes, now)
        await self._writer.commit(out)
        self.elsewhere |= self.committed(notes, out)  # the archive loop follows up

    def committed(self, notes: RosterNotes, out: ArchiveBatch) -> set[str]:
        """After a commit: tell the listener, queue the republications; the cids with a
        newly adopted roster."""
        if out.held:
            self._metrics.rosters_held.inc(len(out.held))
        if out.released:
            self._metrics.rosters_held.dec(len(out.released))
        for record in notes.announce:
            self._listener.roster(record)
        for record in notes.republish:
            self._republisher.queue(record.cid, record.epoch, record.data)
        return {r.cid for r in notes.adopted}

    async def accept(
        self,
        roster: Roster,
        data: bytes,
        source: Source,
        out: ArchiveBatch,
        notes: RosterNotes,
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
            self._refusals.refuse(exc.reason, f"{source} roster of {cid} epoch {epoch}: {exc}")
            if source is Source.ROSTER:
                await self.heal(cid, f"a refused roster ({exc.reason}) is on its topic")
            return
        if verdict is Verdict.HOLD:
            await self._hold(roster, data, source, out, now)
            return
        self._take(roster, data, verdict, source, out, notes, now)
        if verdict is Verdict.KNOWN and source is Source.ROSTER:
            head = await self._cache.head(cid)
            if head is not None and epoch < head:
                await self.heal(cid, f"the retained roster is epoch {epoch}, not {head}")
        elif (
            verdict is Verdict.KNOWN and source.republished and epoch == await self._cache.head(cid)
        ):
            # proposed again (its admin retries, or another gateway adopted it first): the
            # retained roster may still lack it (a republication lost with a gateway)
            notes.republish.append(out.rosters[-1])

    def _take(
        self,
        roster: Roster,
        data: bytes,
        verdict: Verdict,
        source: Source,
        out: ArchiveBatch,
        notes: RosterNotes,
        now: float,
    ) -> None:
        """Put an adopted (or known) roster in the batch and note what follows its commit."""
        cid, epoch = roster.cid, roster.epoch
        record = RosterRecord(
            cid, epoch, roster.digest(), roster.pids, data, signer=roster.signer, archived_at=now
        )
        out.rosters.append(record)  # KNOWN too: idempotent, and it completes a failed commit
        if verdict is Verdict.ADOPT:
            self._cache.adopted(roster)
            notes.adopted.append(record)
            if source.republished:
                notes.republish.append(record)
        if self._announced.get((cid, epoch)) != record.digest:
            self._announced.put((cid, epoch), record.digest)
            notes.announce.append(record)

    async def _hold(
        self, roster: Roster, data: bytes, source: Source, out: ArchiveBatch, now: float
    ) -> None:
        """Keep a roster whose previous epoch is not archived, within the quotas."""
        cid, digest = roster.cid, roster.digest()
        if any(h.cid == cid and h.epoch == roster.epoch and h.digest == digest for h in out.held):
            return
        mine, every = await self._store.held_counts(cid)
        mine += sum(1 for h in out.held if h.cid == cid)
        every += len(out.held)
        detail = f"{source} roster of {cid} epoch {roster.epoch} (its previous epoch is missing)"
        if mine >= self.settings.held_rosters_per_conversation_max:
            self._refusals.refuse("held_conversation_full", detail)
        elif every >= self.settings.held_rosters_max:
            self._refusals.refuse("held_full", detail)
        else:
            self._counters["held"] += 1
            out.held.append(HeldRoster(cid, roster.epoch, digest, data, source.value, now))

    async def promote(self, cids: set[str], *, expire_before: float | None = None) -> set[str]:
        """Adopt the held rosters whose previous epoch is archived now (epoch by epoch,
        so a held chain is adopted whole); drop refused ones and, with
        ``expire_before``, those held since before it. All conversations' when ``cids``
        is empty. The cids with a newly adopted roster."""
        adopted: set[str] = set()
        for _ in range(PROMOTE_ROUNDS):
            held = await self._store.held_rosters(cids=cids, limit=SWEEP_LIMIT)
            if not held:
                break
            held.sort(key=lambda h: (h.cid, h.epoch, h.id or 0))
            parsed = await self._pool.run(_parse_held, held)
            out, notes, now = ArchiveBatch(), RosterNotes(), time.time()
            for h, roster in zip(held, parsed, strict=True):
                assert h.id is not None
                if isinstance(roster, FieldchatError):
                    self._refusals.refuse(roster.reason, f"held roster of {h.cid}: {roster}")
                    out.released.append(h.id)
                elif await self._promote_one(h, roster, out, notes, now, expire_before):
                    out.released.append(h.id)
            if not out:
                break
            await self._writer.commit(out)
            fresh = self.committed(notes, out)
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
        notes: RosterNotes,
        now: float,
        expire_before: float | None,
    ) -> bool:
        """Judge one held roster again; True when it leaves the held store."""
        try:
            verdict = await self._judge(roster)
        except FieldchatError as exc:
            self._refusals.refuse(exc.reason, f"held roster of {held.cid} epoch {held.epoch}")
            return True
        if verdict is Verdict.HOLD:
            if expire_before is not None and held.received_at < expire_before:
                self._refusals.refuse(
                    "roster_expired",
                    f"held roster of {held.cid} epoch {held.epoch}: its chain never arrived",
                )
                return True
            return False
        self._take(roster, held.data, verdict, Source(held.source), out, notes, now)
        return True

    async def heal(self, cid: str, why: str) -> None:
        """Publish the archived head of ``cid`` on its roster topic again (at most once
        per ``HEAL_INTERVAL_S`` a conversation: see ``gateway._rosters.Healer``)."""
        if not self._healer.due(cid):
            return
        head = await self._store.roster_head(cid)
        if head is None:
            return
        log.info("republishing the roster of %s (epoch %d): %s", cid, head[0], why)
        self._counters["healed"] += 1
        self._republisher.queue(cid, head[0], head[1])

    async def count_held(self) -> None:
        """Set the held-rosters gauge from the store (the sweep: other gateways too)."""
        self._metrics.rosters_held.set((await self._store.held_counts(""))[1])


def _parse_held(held: list[HeldRoster]) -> list[Roster | FieldchatError]:
    """Decode held rosters (their signatures again: in the pool)."""
    out: list[Roster | FieldchatError] = []
    for h in held:
        try:
            out.append(Roster.from_bytes(h.data))
        except FieldchatError as exc:
            out.append(exc)
    return out
