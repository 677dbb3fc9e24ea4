"""Reading the receiving chains' delayed-authentication state back (PROTOCOL.md §6.5).

The inverse of :func:`~fieldchat.device._records.covered_record` and
:func:`~fieldchat.device._records.covering_record`, after :func:`load_state` filled the
chains. Unlike the rest of the state these records only resume work in progress, so
a bad one is dropped and counted (``corrupt_record``), never a reason not to start:
its messages stay pending, as they did before this state was kept.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from fieldchat.device._conversation import ChainId, Conversations
from fieldchat.device._coverage import MAX_OTHERS, ChainCoverage, Pending, Waiting
from fieldchat.device._records import COVERED_PREFIX, COVERING_PREFIX, covered_key, covering_key
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas._codec import fields, unpack
from fieldchat.schemas.envelope import MAX_COVER, MAX_ENVELOPE_BYTES, TAG_BYTES
from fieldchat.schemas.errors import CorruptRecord, WireError

__all__ = ["MAX_COVERED_RECORD_BYTES", "MAX_COVERING_RECORD_BYTES", "load_coverage"]

# Coverage records larger than these are not ours: a pending step holds two 32-byte
# digests or keys and at most MAX_OTHERS more digests; a waiting signature holds an
# envelope's sealed bytes and header (its cid bytes are left out to stay below this).
MAX_COVERED_RECORD_BYTES = 64 + 34 * (2 + MAX_OTHERS)
MAX_COVERING_RECORD_BYTES = MAX_ENVELOPE_BYTES
_DIGEST_BYTES = 32

Coverage = dict[tuple[str, ChainId], ChainCoverage]
T = TypeVar("T")


def load_coverage(
    store: KeyStore, conversations: Conversations, counters: Counter[str]
) -> tuple[Coverage, list[str]]:
    """The receiving chains' delayed-authentication state (§6.5), and the names of the
    records to delete: of chains no longer kept, and corrupt, oversized or beyond the
    bounds ones (each counted under :class:`CorruptRecord`'s reason, never raised: they
    only resume work in progress, and losing one leaves its messages pending)."""
    out: Coverage = {}
    drop: list[str] = []

    def coverage_of(key: str, chain: ChainId) -> ChainCoverage | None:
        conv = conversations.by_cid.get(key.split("/")[1])
        if conv is None or chain not in conv.recv:
            drop.append(key)  # a chain dropped since (old epoch, removed member)
            return None
        return out.setdefault((conv.cid, chain), ChainCoverage())

    # Newest steps first: past the bounds the oldest go, as in ChainCoverage.
    pending = _newest_first(store.load_prefix(COVERED_PREFIX), drop, counters, _pending)
    for key, (chain, step, entry) in pending:
        coverage = coverage_of(key, chain)
        if coverage is not None and not coverage.restore(step, entry):
            counters[CorruptRecord.reason] += 1
            drop.append(key)
    waiting = _newest_first(store.load_prefix(COVERING_PREFIX), drop, counters, _waiting)
    for key, (chain, _, stored) in waiting:
        coverage = coverage_of(key, chain)
        if coverage is None:
            continue
        aad = stored.aad + conversations.by_cid[key.split("/")[1]].cid_bytes
        if not coverage.restore_waiting(dataclasses.replace(stored, aad=aad)):
            counters[CorruptRecord.reason] += 1
            drop.append(key)
    return out, drop


def _fields(raw: bytes, limit: int, count: int) -> tuple[Any, ...]:
    """A record's fields, checked for size and shape only.

    Raises:
        CorruptRecord: oversized, not msgpack, or not an array of ``count`` items.
    """
    if len(raw) > limit:
        raise CorruptRecord(f"coverage record of {len(raw)} bytes")
    try:
        return fields(unpack(raw, "coverage record"), count, "coverage record")
    except WireError as exc:
        raise CorruptRecord("coverage record does not parse") from exc


def _newest_first(
    records: dict[str, bytes],
    drop: list[str],
    counters: Counter[str],
    parse: Callable[[str, bytes], tuple[ChainId, int, T]],
) -> list[tuple[str, tuple[ChainId, int, T]]]:
    """Parse each record (dropping and counting the corrupt ones), newest step first."""
    parsed = []
    for key, raw in records.items():
        try:
            parsed.append((key, parse(key, raw)))
        except CorruptRecord as exc:
            counters[exc.reason] += 1
            drop.append(key)
    return sorted(parsed, key=lambda item: -item[1][1])


def _ints(values: tuple[Any, ...]) -> bool:
    return all(type(v) is int and 0 <= v < 2**63 for v in values)


def _pending(key: str, raw: bytes) -> tuple[ChainId, int, Pending]:
    """A pending step's record (see :func:`~fieldchat.device._records.covered_record`).

    Raises:
        CorruptRecord: oversized, not msgpack, another shape, or named for another step.
    """
    epoch, sender, chain, step, digest, msg_key, others = _fields(raw, MAX_COVERED_RECORD_BYTES, 7)
    chain_id = (epoch, sender, chain)
    if (
        not _ints((epoch, sender, chain, step))
        or key != covered_key(key.split("/")[1], chain_id, step)
        or not _digests((digest, msg_key))
        or not isinstance(others, tuple)
        or len(others) > MAX_OTHERS
        or not _digests(others)
    ):
        raise CorruptRecord("coverage record holds another shape")
    return chain_id, step, Pending(digest, msg_key, others)


def _waiting(key: str, raw: bytes) -> tuple[ChainId, int, Waiting]:
    """A waiting signature's record; its ``aad`` still lacks the cid bytes.

    Raises:
        CorruptRecord: oversized, not msgpack, another shape, or named for another step.
    """
    epoch, sender, chain, step, cover, msg_key, sealed, header = _fields(
        raw, MAX_COVERING_RECORD_BYTES, 8
    )
    chain_id = (epoch, sender, chain)
    if (
        not _ints((epoch, sender, chain, step, cover))
        or not 0 < cover <= min(step, MAX_COVER)
        or key != covering_key(key.split("/")[1], chain_id, step)
        or not _digests((msg_key,))
        or not isinstance(sealed, bytes)
        or len(sealed) < TAG_BYTES
        or not isinstance(header, bytes)
    ):
        raise CorruptRecord("coverage record holds another shape")
    return chain_id, step, Waiting(step, cover, msg_key, sealed, header)


def _digests(values: tuple[Any, ...]) -> bool:
    return all(isinstance(v, bytes) and len(v) == _DIGEST_BYTES for v in values)
