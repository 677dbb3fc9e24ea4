"""Delayed authentication of unsigned envelopes (PROTOCOL.md §6.5).

With ``sign_every`` = N only every Nth envelope is signed; an unsigned one proves only
that some member holding the chain key sealed it. Each signed envelope's AES-GCM tag
also covers the digests of the unsigned envelopes of its chain just before it (its
header's ``cover`` counts them), and its signature proves those tag bytes are the
sender's. So once a receiver holds the covered envelopes it knows whether what it
showed is what the sender sent: *verified*, or a *forgery* by another member.

A pure object per receiving chain, no clock and no I/O: the opener feeds it what it
opened and gets back what got settled. Its state is bounded (MAX_PENDING digests and
keys, MAX_OTHERS further candidates, MAX_WAITING signed envelopes, per chain), and so
is its work: MAX_COVER_TRIES tag checks per signed envelope. It notes which entries
changed (:meth:`ChainCoverage.take_changes`), so the opener persists one record per
pending step and per waiting signature, and a restart resumes where it was.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from fieldchat.device.chains import nonce
from fieldchat.schemas.crypto import aead_open
from fieldchat.schemas.envelope import MAX_COVER, coverage_digest
from fieldchat.schemas.errors import CryptoError

__all__ = [
    "MAX_COVER_TRIES",
    "MAX_OTHERS",
    "MAX_PENDING",
    "MAX_WAITING",
    "ChainCoverage",
    "Pending",
    "Settled",
    "Verdict",
    "Waiting",
]

MAX_PENDING = MAX_COVER  # unsigned steps waiting per chain (oldest dropped: stays pending)
MAX_OTHERS = 16  # further authentic candidates kept per chain (member forgeries)
MAX_WAITING = 4  # signed envelopes waiting for a covered step per chain
# Combinations of candidates tried per signed envelope, one AES-GCM tag check each
# (≈ 2 µs for a short text): one forged step per window needs 2, four need 16.
MAX_COVER_TRIES = 64


class Verdict(enum.StrEnum):
    """What a signed envelope said of the unsigned steps it covers."""

    VERIFIED = "verified"  # what we showed is what the sender sent
    FORGED = "forged"  # what we showed is not (another member sealed it)


class Settled(NamedTuple):
    """Steps of one chain a signed envelope settled. ``pinpointed`` (forgeries): the
    sender's own envelope of each step was among the candidates, so exactly these steps
    are forged; otherwise one or more of ``steps`` is, and none could be told apart."""

    steps: tuple[int, ...]
    verdict: Verdict
    pinpointed: bool = True


class Pending(NamedTuple):
    """One pending step as persisted: the shown candidate's digest, the step's message
    key and the digests of the other authentic candidates."""

    digest: bytes
    key: bytes
    others: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Waiting:
    """A signed envelope, signature verified, whose covered steps are not all here."""

    step: int
    cover: int
    key: bytes  # its message key: the tag is checked against each candidate digest
    sealed: bytes  # ciphertext || tag
    aad: bytes  # header || cid bytes; the coverage digest is appended


@dataclass(slots=True)
class ChainCoverage:
    """One receiving chain's unsigned envelopes awaiting the signature that covers them.

    ``shown``: step -> digest of the candidate opened (and shown as pending);
    ``keys``: step -> its message key, to authenticate another candidate of the step;
    ``others``: step -> digests of other candidates that authenticated (a member's).
    ``changed``, ``changed_waiting``: steps whose entry changed since
    :meth:`take_changes` (added, grown or forgotten).
    """

    shown: dict[int, bytes] = field(default_factory=dict)
    keys: dict[int, bytes] = field(default_factory=dict)
    others: dict[int, list[bytes]] = field(default_factory=dict)
    waiting: dict[int, Waiting] = field(default_factory=dict)
    changed: set[int] = field(default_factory=set)
    changed_waiting: set[int] = field(default_factory=set)

    def pending(self, step: int) -> bool:
        """Whether ``step`` was opened unsigned and is not settled yet."""
        return step in self.shown

    def unsigned(self, step: int, digest: bytes, key: bytes) -> list[Settled]:
        """An unsigned envelope of ``step`` opened (and shown as pending)."""
        self.shown[step] = digest
        self.keys[step] = key
        self.changed.add(step)
        if len(self.shown) > MAX_PENDING:  # the oldest stays pending for good
            self._forget(min(self.shown))
        return self._retry(step)

    def candidate(self, step: int, digest: bytes, sealed: bytes, aad: bytes) -> bool:
        """Another envelope for a pending ``step``; whether it is a new authentic one
        (kept as a candidate for the covering signature). Junk costs one AES-GCM."""
        if self.shown.get(step) == digest or digest in self.others.get(step, ()):
            return False
        if sum(len(v) for v in self.others.values()) >= MAX_OTHERS:
            return False
        try:
            aead_open(self.keys[step], nonce(step), sealed, aad)
        except CryptoError:
            return False
        self.others.setdefault(step, []).append(digest)
        self.changed.add(step)
        return True

    def retry(self, step: int) -> list[Settled]:
        """Settle what a new candidate of ``step`` may complete."""
        return self._retry(step)

    def signed(self, step: int, cover: int, key: bytes, sealed: bytes, aad: bytes) -> list[Settled]:
        """A signed envelope (signature verified) covering ``cover`` steps before it."""
        if not cover:
            return []
        signed = Waiting(step, cover, key, sealed, aad)
        if any(s not in self.shown for s in range(step - cover, step)):
            self._wait(signed)
            return []
        return self._settle(signed)

    def _retry(self, step: int) -> list[Settled]:
        for signed in list(self.waiting.values()):
            if signed.step - signed.cover <= step < signed.step and all(
                s in self.shown for s in range(signed.step - signed.cover, signed.step)
            ):
                del self.waiting[signed.step]
                self.changed_waiting.add(signed.step)
                return self._settle(signed)
        return []

    def _settle(self, signed: Waiting) -> list[Settled]:
        steps = range(signed.step - signed.cover, signed.step)
        choices = [[self.shown[s], *self.others.get(s, ())] for s in steps]
        found: tuple[bytes, ...] | None = None
        for combo in itertools.islice(itertools.product(*choices), MAX_COVER_TRIES):
            try:
                aead_open(
                    signed.key,
                    nonce(signed.step),
                    signed.sealed,
                    signed.aad + coverage_digest(combo),
                )
            except CryptoError:
                continue
            found = combo
            break
        out: list[Settled] = []
        if found is None:
            out.append(Settled(tuple(steps), Verdict.FORGED, pinpointed=False))
        else:
            good = tuple(s for s, d in zip(steps, found, strict=True) if d == self.shown[s])
            bad = tuple(s for s, d in zip(steps, found, strict=True) if d != self.shown[s])
            if good:
                out.append(Settled(good, Verdict.VERIFIED))
            if bad:
                out.append(Settled(bad, Verdict.FORGED))
        for s in steps:
            self._forget(s)
        return out

    def _wait(self, signed: Waiting) -> None:
        self.waiting[signed.step] = signed
        self.changed_waiting.add(signed.step)
        if len(self.waiting) > MAX_WAITING:
            oldest = min(self.waiting)
            del self.waiting[oldest]  # its steps stay pending
            self.changed_waiting.add(oldest)

    def _forget(self, step: int) -> None:
        self.changed.add(step)
        self.shown.pop(step, None)
        self.keys.pop(step, None)
        self.others.pop(step, None)

    # -- persistence (the opener writes, the loader reads; no I/O here) ---------------

    def take_changes(self) -> tuple[list[int], list[int]]:
        """The pending steps and the waiting signatures changed since the last call
        (look each up with :meth:`entry` / :attr:`waiting`: gone means delete)."""
        out = (sorted(self.changed), sorted(self.changed_waiting))
        self.changed, self.changed_waiting = set(), set()
        return out

    def entry(self, step: int) -> Pending | None:
        """What to persist of a pending ``step`` (``None``: settled or forgotten)."""
        digest = self.shown.get(step)
        if digest is None:
            return None
        return Pending(digest, self.keys[step], tuple(self.others.get(step, ())))

    def restore(self, step: int, pending: Pending) -> bool:
        """Adopt a persisted pending step; whether it fit the bounds (kept unchanged)."""
        extra = sum(len(v) for v in self.others.values()) + len(pending.others)
        if len(self.shown) >= MAX_PENDING or step in self.shown or extra > MAX_OTHERS:
            return False
        self.shown[step] = pending.digest
        self.keys[step] = pending.key
        if pending.others:
            self.others[step] = list(pending.others)
        return True

    def restore_waiting(self, signed: Waiting) -> bool:
        """Adopt a persisted waiting signature; whether it fit the bounds."""
        if len(self.waiting) >= MAX_WAITING or signed.step in self.waiting:
            return False
        self.waiting[signed.step] = signed
        return True
