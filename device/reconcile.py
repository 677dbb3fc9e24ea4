"""Reconciling a device with the gateway's archive (issue 14, docs/gateway.md
"Reconciliation"): its own envelopes until archived, and a tail that skips what it holds.

* **Own envelopes.** A broker can lose envelopes on their way to the archive while the
  members got them (Mosquitto restores no ``$share/…`` subscription after a restart).
  The sender is the one that knows what it sent: with a gateway it keeps every own
  envelope until an archive check confirms it, and uploads what the archive lacks
  (:func:`reconcile`, on the device's history thread).
* **The tail.** A tail round names, per chain, the highest step held contiguously
  (:func:`tail_marks`): the gateway returns only what the device lacks, and a device
  that missed nothing pays one small request.

Pure apart from the calls on the source; :class:`device.client.Device` schedules and
applies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fieldchat.device.history import (
    CHECK_CHAINS,
    CHECK_STEPS,
    HAVE_MAX,
    UPLOAD_BYTES,
    UPLOAD_ENVELOPES,
    Checked,
    Uploaded,
    digest,
)
from fieldchat.device.rows import Gap, OwnEnvelope
from fieldchat.schemas.errors import FieldchatError, NotAuthorized, TransportError

__all__ = [
    "ARCHIVE_AGAIN_S",
    "ARCHIVE_DRAIN_AGAIN_S",
    "ARCHIVE_ROUND",
    "ARCHIVE_SETTLE_S",
    "TRANSIENT_REFUSALS",
    "ArchiveSchedule",
    "Outcome",
    "Reconciling",
    "reconcile",
    "tail_marks",
]

# Own envelopes named per round (4 checks of 1,500 steps); a round that had more comes
# back ARCHIVE_AGAIN_S later, else after LinkOptions.archive_check_s.
ARCHIVE_ROUND = 4 * CHECK_STEPS
ARCHIVE_AGAIN_S = 1.0
# Only envelopes published this long ago are checked: the archiver commits in batches
# (20 ms by default) and a check a moment after publishing would upload them again.
ARCHIVE_SETTLE_S = 2.0
# After a connect the first round waits for the outbox to drain, looking this often.
ARCHIVE_DRAIN_AGAIN_S = 0.5
# Upload refusals that may pass later (docs/gateway.md): the roster of the epoch is not
# archived yet, or a pending store is full. Any other is final: the envelope is marked
# refused and no longer kept for the archive (logged, counted ``archive_refused``).
TRANSIENT_REFUSALS = frozenset(
    {"roster_unknown", "pending_full", "pending_conversation_full", "pending_sender_full"}
)

Key = tuple[int, int, int, int]  # epoch, sender index, chain, step
RowKey = tuple[str, int, int, int]  # cid, epoch, chain, step (a row of sent or kept)


@runtime_checkable
class Reconciling(Protocol):
    """A history source that also reconciles (:class:`device.history.GatewayHistory`):
    with one, a device keeps its own envelopes until the archive has them."""

    def since(
        self,
        cid: str,
        after: int,
        limit: int,
        *,
        from_epoch: int = 0,
        have: Sequence[Key] = (),
    ) -> tuple[list[bytes], int, bool]: ...

    def check_archive(self, cid: str, steps: Sequence[tuple[Key, bytes]]) -> Checked: ...

    def upload(self, cid: str, envelopes: Sequence[bytes]) -> Uploaded: ...


class ArchiveSchedule:
    """When the next reconciliation round runs (pure: ``now`` comes in).

    After each (re)connect a round follows once the outbox drained (for at most
    ``archive_check_s``: a device that never stops sending still checks), then every
    ``archive_check_s`` while own envelopes wait for confirmation, and ARCHIVE_AGAIN_S
    after a full round. One round at a time.
    """

    def __init__(self) -> None:
        self.due: float | None = None  # the next round; None when none is planned
        self.running = False
        self._drain_until = 0.0

    def connected(self, now: float, check_s: float) -> None:
        self.due = now + ARCHIVE_SETTLE_S
        self._drain_until = now + check_s

    def is_due(self, now: float) -> bool:
        return self.due is not None and now >= self.due and not self.running

    def drained(self, now: float, outbox_waiting: Callable[[], bool]) -> bool:
        """Whether a due round may look now: not while a reconnect's outbox drains
        (``outbox_waiting``, asked only then); it looks again shortly."""
        if now < self._drain_until and outbox_waiting():
            self.due = now + ARCHIVE_DRAIN_AGAIN_S  # what a reconnect queued goes first
            return False
        self._drain_until = 0.0
        return True

    def idle(self, now: float, check_s: float) -> None:
        """Nothing to confirm: look again later (a local query, no request)."""
        self.due = now + check_s

    def started(self) -> None:
        self.running = True

    def finished(self, now: float, *, full: bool, failed: bool, check_s: float) -> None:
        """A round ended: the next soon after a full one that did not fail."""
        self.running = False
        self.due = now + (ARCHIVE_AGAIN_S if full and not failed else check_s)

    def stop(self) -> None:
        """No archive to reconcile with (any more)."""
        self.due = None


@dataclass(slots=True)
class Outcome:
    """What one reconciliation round found, applied by the worker."""

    confirmed: list[RowKey] = field(default_factory=list)  # archived (or already were)
    refused: list[tuple[RowKey, str]] = field(default_factory=list)  # for good
    checked: int = 0  # own envelopes named in checks
    uploaded: int = 0  # of those, uploaded and archived now
    errors: list[str] = field(default_factory=list)
    unauthorized: set[str] = field(default_factory=set)  # conversations that refused us


def _row(cid: str, e: OwnEnvelope) -> RowKey:
    return (cid, e.epoch, e.chain, e.step)


def _key(e: OwnEnvelope) -> Key:
    return (e.epoch, e.sender_index, e.chain, e.step)


def _check_batches(rows: Sequence[OwnEnvelope]) -> list[list[OwnEnvelope]]:
    """Rows of one conversation in checks of at most CHECK_CHAINS chains and
    CHECK_STEPS steps, in order."""
    out: list[list[OwnEnvelope]] = []
    chains: set[tuple[int, int, int]] = set()
    for row in rows:
        chain = (row.epoch, row.sender_index, row.chain)
        if (
            not out
            or len(out[-1]) >= CHECK_STEPS
            or (chain not in chains and len(chains) >= CHECK_CHAINS)
        ):
            out.append([])
            chains = set()
        out[-1].append(row)
        chains.add(chain)
    return out


def _upload_batches(rows: Sequence[OwnEnvelope]) -> list[list[OwnEnvelope]]:
    """At most UPLOAD_ENVELOPES and UPLOAD_BYTES a request (one larger envelope alone)."""
    out: list[list[OwnEnvelope]] = []
    size = 0
    for row in rows:
        if not out or len(out[-1]) >= UPLOAD_ENVELOPES or size + len(row.payload) > UPLOAD_BYTES:
            out.append([])
            size = 0
        out[-1].append(row)
        size += len(row.payload)
    return out


def reconcile(source: Reconciling, rows: Iterable[OwnEnvelope]) -> Outcome:
    """Check ``rows`` (own envelopes) with the archive and upload what it lacks.

    Errors are recorded, never raised: what was not confirmed stays unconfirmed and
    is named again in a later round. A conversation that refuses us
    (:class:`NotAuthorized`: not a member any more, or a roster it has not archived)
    is recorded in ``unauthorized`` and not asked again this round; a gateway that
    cannot be reached ends the round (each request could wait for its timeout).
    """
    out = Outcome()
    by_cid: dict[str, list[OwnEnvelope]] = defaultdict(list)
    for row in rows:
        by_cid[row.cid].append(row)
    for cid, mine in by_cid.items():
        try:
            for batch in _check_batches(mine):
                answer = source.check_archive(cid, [(_key(r), digest(r.payload)) for r in batch])
                out.checked += len(batch)
                missing = set(answer.missing)
                lacking = [r for r in batch if _key(r) in missing]
                out.confirmed += [_row(cid, r) for r in batch if _key(r) not in missing]
                for part in _upload_batches(lacking):
                    done = source.upload(cid, [r.payload for r in part])
                    refused = dict(done.refused)
                    for i, r in enumerate(part):
                        reason = refused.get(i)
                        if reason is None:
                            continue
                        if reason not in TRANSIENT_REFUSALS:
                            out.refused.append((_row(cid, r), reason))
                    # Pending rows are archived once the sender's bundle is (none for a
                    # device whose signed request proved its bundle): checked again.
                    if done.pending == 0:
                        accepted = [r for i, r in enumerate(part) if i not in refused]
                        out.confirmed += [_row(cid, r) for r in accepted]
                        out.uploaded += done.archived
        except NotAuthorized as exc:
            out.unauthorized.add(cid)
            out.errors.append(f"{cid}: {exc}")
        except TransportError as exc:  # unreachable: the other conversations would wait too
            out.errors.append(f"{cid}: {exc}")
            break
        except FieldchatError as exc:
            out.errors.append(f"{cid}: {exc}")
    return out


def tail_marks(
    held: Mapping[tuple[int, int, int], int],
    gaps: Iterable[Gap],
    own: Mapping[tuple[int, int, int], int],
    *,
    from_epoch: int = 0,
) -> list[Key]:
    """``have`` for a tail request: per chain ``(epoch, sender, chain)``, the highest
    step held contiguously — the highest shown (``held``), or below the lowest gap
    recorded for that chain — and for our own chains the highest step we sent
    (``own``). Chains of epochs before ``from_epoch`` are left out (the gateway skips
    those epochs anyway); at most HAVE_MAX, newest epochs first; a chain with nothing
    held contiguously (-1) is left out (it is returned whole).
    """
    below: dict[tuple[int, int, int], int] = {}
    for gap in gaps:
        chain = (gap.epoch, gap.sender_index, gap.chain)
        below[chain] = min(below.get(chain, gap.first), gap.first)
    marks: dict[tuple[int, int, int], int] = {}
    for chain, high in held.items():
        marks[chain] = min(high, below[chain] - 1) if chain in below else high
    for chain, high in own.items():
        marks[chain] = max(high, marks.get(chain, -1))
    chosen = sorted(
        ((c, h) for c, h in marks.items() if c[0] >= from_epoch and h >= 0),
        key=lambda item: (-item[0][0], item[0]),
    )[:HAVE_MAX]
    return [(e, s, c, h) for (e, s, c), h in sorted(chosen)]
