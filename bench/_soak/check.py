"""What the soak checks at the end: every screen and the archive against what the
senders accepted. Pure: it reads records, it does not run anything.

* A sender *accepted* a message when ``Device.send`` returned: the row is in its
  state file's ``sent`` table (durable against SIGKILL). Its text is
  ``soak <device> <n>``, ``n`` counting from 1 per sender and conversation.
* A *screen* is what ``fieldchat device … listen --json`` printed, across all the
  restarts of that device, in order.
* lost: accepted, and not on the screen of some other member of the conversation.
  duplicated: a line for a message already on that screen. out of order: the first
  line for ``n`` after a line for a higher ``n`` of the same sender and conversation
  (a line shown again counts as duplicated only).
* The archive holds ciphertext; envelopes are matched by their header
  ``(cid, epoch, sender index, chain, step)``. missing: an accepted message with no
  archived envelope; duplicates: envelopes beyond the first per header; unexpected:
  an archived text no sender accepted (the archive must equal what was accepted).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fieldchat.schemas.envelope import EnvelopeKind

__all__ = [
    "ArchiveVerdict",
    "ArchivedEnvelope",
    "ScreenLine",
    "ScreenVerdict",
    "SentMessage",
    "check_archive",
    "check_screens",
    "parse_screen",
    "runs",
    "soak_text",
]

TEXT = re.compile(r"^soak (\S+) (\d+)$")
SAMPLES = 10  # examples (runs, for lost and missing) kept per finding, to start debugging from
TEXT_KIND = int(EnvelopeKind.TEXT)


def soak_text(device: str, n: int) -> str:
    return f"soak {device} {n}"


@dataclass(frozen=True, slots=True)
class SentMessage:
    """One message a sender accepted, from its state file."""

    device: str
    cid: str
    n: int
    epoch: int
    index: int  # the sender's index in the roster of ``epoch``
    chain: int
    step: int

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return (self.cid, self.epoch, self.index, self.chain, self.step)


@dataclass(frozen=True, slots=True)
class ScreenLine:
    """A soak message as one ``listen --json`` line showed it."""

    cid: str
    device: str  # the sender, from the text
    n: int


@dataclass(frozen=True, slots=True)
class ArchivedEnvelope:
    cid: str
    kind: int  # schemas.envelope.EnvelopeKind
    epoch: int
    index: int
    chain: int
    step: int

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return (self.cid, self.epoch, self.index, self.chain, self.step)


def parse_screen(lines: Iterable[str]) -> tuple[list[ScreenLine], int]:
    """The soak messages of a screen, in order, and how many lines were unreadable
    (a process killed in the middle of a write can leave half a line)."""
    shown: list[ScreenLine] = []
    unreadable = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        match = TEXT.match(str(item.get("text", "")))
        if match is None:
            continue
        shown.append(ScreenLine(str(item.get("cid")), match.group(1), int(match.group(2))))
    return shown, unreadable


@dataclass
class _Tally:
    """Counts, and a few examples of each finding (``samples``)."""

    samples: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def sample(self, what: str, item: Any) -> None:  # noqa: ANN401 - JSON-ready values
        if len(self.samples[what]) < SAMPLES:
            self.samples[what].append(item)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)[1:]}
        if self.samples:
            out["samples"] = dict(self.samples)
        return out


@dataclass
class ScreenVerdict(_Tally):
    expected: int = 0
    shown: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unexpected: int = 0  # shown, but no sender accepted it
    unreadable_lines: int = 0


def check_screens(
    sent: Iterable[SentMessage],
    members: Mapping[str, Iterable[str]],
    screens: Mapping[str, tuple[list[ScreenLine], int]],
    labels: Mapping[str, str] | None = None,
) -> dict[str, ScreenVerdict]:
    """One verdict per device screen. ``members``: cid → devices; ``labels``: cid →
    a short name for samples (``group``, ``direct``)."""
    labels = labels or {}
    accepted: dict[tuple[str, str], set[int]] = defaultdict(set)  # (cid, sender) -> n
    for message in sent:
        accepted[(message.cid, message.device)].add(message.n)
    verdicts: dict[str, ScreenVerdict] = {}
    lost: list[tuple[str, str, int]] = []
    for device, (lines, unreadable) in screens.items():
        verdict = verdicts[device] = ScreenVerdict(unreadable_lines=unreadable)
        seen: Counter[tuple[str, str, int]] = Counter()
        highest: dict[tuple[str, str], int] = {}
        for line in lines:
            verdict.shown += 1
            where = labels.get(line.cid, line.cid)
            stream = (line.cid, line.device)
            seen[(line.cid, line.device, line.n)] += 1
            if seen[(line.cid, line.device, line.n)] > 1:
                verdict.duplicated += 1  # counted once: not out of order as well
                verdict.sample("duplicated", [where, line.device, line.n])
                continue
            if line.n not in accepted.get(stream, ()):
                verdict.unexpected += 1
                verdict.sample("unexpected", [where, line.device, line.n])
            top = highest.get(stream, 0)
            if line.n < top:
                verdict.out_of_order += 1
                verdict.sample("out_of_order", [where, line.device, line.n, "after", top])
            else:
                highest[stream] = line.n
        for cid, devices in members.items():
            if device not in devices:
                continue
            for sender in devices:
                if sender == device:
                    continue
                for n in sorted(accepted.get((cid, sender), ())):
                    verdict.expected += 1
                    if not seen[(cid, sender, n)]:
                        verdict.lost += 1
                        lost.append((labels.get(cid, cid), sender, n))
        if lost:
            verdict.samples["lost"] = runs(lost)[:SAMPLES]
            lost.clear()
    return verdicts


def runs(items: Iterable[tuple[str, str, int]]) -> list[list[Any]]:
    """``(where, sender, n)`` as runs of consecutive ``n``: ``[where, sender, first,
    last]`` (holes come in runs: a broker restart, a lost subscription)."""
    out: list[list[Any]] = []
    for where, sender, n in sorted(items):
        if out and out[-1][:2] == [where, sender] and out[-1][3] == n - 1:
            out[-1][3] = n
        else:
            out.append([where, sender, n, n])
    return out


@dataclass
class ArchiveVerdict(_Tally):
    rows: int = 0
    expected: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0  # archived texts no sender accepted


def check_archive(
    sent: Iterable[SentMessage],
    archived: Iterable[ArchivedEnvelope],
    labels: Mapping[str, str] | None = None,
) -> ArchiveVerdict:
    """Every accepted message archived, every envelope archived once, no text that no
    sender accepted."""
    labels = labels or {}
    sent = list(sent)
    accepted = {message.key for message in sent}
    verdict = ArchiveVerdict()
    counts: Counter[tuple[str, int, int, int, int]] = Counter()
    for envelope in archived:
        verdict.rows += 1
        counts[envelope.key] += 1
        if envelope.kind == TEXT_KIND and envelope.key not in accepted:
            verdict.unexpected += 1
            verdict.sample(
                "unexpected", [labels.get(envelope.cid, envelope.cid), *envelope.key[1:]]
            )
    for key, count in counts.items():
        if count > 1:
            verdict.duplicates += count - 1
            verdict.sample("duplicates", [labels.get(key[0], key[0]), *key[1:]])
    missing = []
    for message in sent:
        verdict.expected += 1
        if not counts[message.key]:
            verdict.missing += 1
            missing.append((labels.get(message.cid, message.cid), message.device, message.n))
    if missing:
        verdict.samples["missing"] = runs(missing)[:SAMPLES]
    return verdict
