"""Authenticating and decrypting envelopes (PROTOCOL.md §6.4), the per-message path.

Nothing here locks: the :class:`~fieldchat.device.engine.Engine` façade holds its lock
around each call, except around :meth:`Opener.preverify`'s signature checks, which
run outside it on purpose (two threads; Ed25519 releases the GIL).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import NamedTuple

from fieldchat.device._conversation import ChainId, Conversations
from fieldchat.device._coverage import ChainCoverage, Settled, Verdict
from fieldchat.device._records import (
    Writes,
    covered_key,
    covered_record,
    covering_key,
    covering_record,
    recv_key,
    recv_record,
)
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import Control, Message, Receipt, decode_plaintext
from fieldchat.schemas.crypto import aead_decrypt_signed, aead_open
from fieldchat.schemas.envelope import (
    FLAG_COMPRESSED,
    FLAG_PADDED,
    FLAG_SIGNED,
    EnvelopeKind,
    Header,
    envelope_digest,
    read_header,
    verify_signature,
)
from fieldchat.schemas.errors import (
    ChainClosed,
    ChainEndUnknown,
    CryptoError,
    FieldchatError,
    MissingKey,
    NotAMember,
    SignatureRequired,
    StaleEpoch,
    UnknownConversation,
)

__all__ = ["AUTO_FLUSH_OPENS", "Opened", "Opener", "Settlement"]

AUTO_FLUSH_OPENS = 1_000  # receiving-chain state is written at least this often
_CODED = FLAG_COMPRESSED | FLAG_PADDED


class Opened(NamedTuple):
    """A decrypted, authenticated envelope (a named tuple: built once per message)."""

    cid: str
    sender: str
    epoch: int
    sender_index: int
    chain: int
    step: int
    message: Message
    signed: bool
    # Unsigned in a conversation that signs every Nth step: shown as pending until the
    # sender's next signed envelope covers it (PROTOCOL.md §6.5; a Settlement follows).
    pending: bool = False

    @property
    def dedupe_key(self) -> tuple[str, int, int, int, int]:
        return (self.cid, self.epoch, self.sender_index, self.chain, self.step)

    @property
    def forgeable_control(self) -> bool:
        """An unsigned control of a kind acted on only when signed (§6.5): any member
        could have sealed it in the sender's name, so nobody acts on it."""
        message = self.message
        return isinstance(message, Control) and message.op.signed_only and not self.signed


class Settlement(NamedTuple):
    """Pending unsigned messages of one chain that a signed envelope settled (§6.5)."""

    cid: str
    sender: str
    epoch: int
    sender_index: int
    chain: int
    steps: tuple[int, ...]
    verdict: Verdict
    pinpointed: bool  # forgeries: exactly these steps (else: some of them)


class _KeepKey:
    """An ``Aead`` for RecvChain.open that also keeps the message key it was given."""

    __slots__ = ("key", "signed")

    def __init__(self, *, signed: bool) -> None:
        self.key = b""
        self.signed = signed

    def __call__(self, key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        self.key = key
        if self.signed:  # the signature verified these bytes; the tag is checked apart
            return aead_decrypt_signed(key, nonce, sealed)
        return aead_open(key, nonce, sealed, aad)


def _decrypt_signed(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:  # noqa: ARG001
    return aead_decrypt_signed(key, nonce, sealed)


SignatureJob = tuple[bytes, bytes, bytes]
"""``(signed envelope, cid bytes, signer key)``: one signature to check."""


def _verify_all(jobs: list[SignatureJob]) -> list[tuple[bytes, bytes]]:
    """``(envelope, signer key)`` of the jobs whose signature verifies."""
    out = []
    for data, cid_bytes, key in jobs:
        try:
            verify_signature(data, cid_bytes, key)
        except CryptoError:
            continue
        out.append((data, key))
    return out


class Opener:
    """Opens envelopes with the receiving chains; persists their state in batches.

    ``dirty``: the receiving chains changed since they were persisted (shared with
    the keying, which drops the chains of removed members).
    """

    def __init__(
        self,
        pid: str,
        *,
        store: KeyStore,
        counters: Counter[str],
        conversations: Conversations,
        dirty: set[tuple[str, ChainId]],
    ) -> None:
        self._pid = pid
        self._store = store
        self._counters = counters
        self._convs = conversations.by_cid
        self._dirty = dirty
        self._opens_since_flush = 0
        # Envelopes whose signature preverify() checked: bytes -> the signer key it
        # verified under. Replaced per batch, entries dropped as open() uses them.
        self._preverified: dict[bytes, bytes] = {}
        # Delayed authentication (§6.5): per receiving chain, persisted by flush() with
        # the chains (one record per changed entry); ``_coverage_writes``: deletions of
        # dropped chains' and unusable records, due at the next flush.
        self._coverage: dict[tuple[str, ChainId], ChainCoverage] = {}
        self._coverage_dirty: set[tuple[str, ChainId]] = set()
        self._coverage_writes: Writes = {}
        self._settled: list[Settlement] = []

    def adopt_coverage(
        self, coverage: dict[tuple[str, ChainId], ChainCoverage], drop: list[str]
    ) -> None:
        """At load: the coverage state read back, and the records to delete."""
        self._coverage = coverage
        self._coverage_writes.update(dict.fromkeys(drop))

    def take_settled(self) -> list[Settlement]:
        """See :meth:`Engine.take_settled`."""
        out, self._settled = self._settled, []
        return out

    def _drop_stale_coverage(self) -> None:
        """Forget the coverage of receiving chains no longer kept (old epochs, removed
        members): one pass per new chain seen, so the table follows the chains."""
        for cid, chain_id in list(self._coverage):
            conv = self._convs.get(cid)
            if conv is None or chain_id not in conv.recv:
                gone = self._coverage.pop((cid, chain_id))
                self._coverage_dirty.discard((cid, chain_id))
                for step in gone.shown.keys() | gone.changed:
                    self._coverage_writes[covered_key(cid, chain_id, step)] = None
                for step in gone.waiting.keys() | gone.changed_waiting:
                    self._coverage_writes[covering_key(cid, chain_id, step)] = None

    def _settle(self, cid: str, chain_id: ChainId, sender: str, done: list[Settled]) -> None:
        for steps, verdict, pinpointed in done:
            self._counters[f"coverage_{verdict}"] += len(steps)
            self._settled.append(Settlement(cid, sender, *chain_id, steps, verdict, pinpointed))

    def next_step(self, cid: str, chain_id: ChainId) -> int | None:
        """See :meth:`Engine.next_step`."""
        conv = self._convs.get(cid)
        receiving = conv.recv.get(chain_id) if conv else None
        return None if receiving is None else receiving.step

    def reach(self, cid: str, chain_id: ChainId) -> int | None:
        """See :meth:`Engine.reach`."""
        conv = self._convs.get(cid)
        receiving = conv.recv.get(chain_id) if conv else None
        return None if receiving is None else receiving.reach()

    def oldest_epoch(self, cid: str) -> int:
        """See :meth:`Engine.oldest_epoch`."""
        conv = self._convs.get(cid)
        if conv is None:
            return 0
        return min([conv.epoch, *(epoch for epoch, _, _ in conv.recv)])

    def authentic(self, cid: str, data: bytes, header: Header | None) -> bool | None:
        """See :meth:`Engine.authentic`."""
        conv = self._convs.get(cid)
        if header is None:
            try:
                header = read_header(data)
            except FieldchatError:
                return None
        chain = conv.recv.get(header.chain_id) if conv else None
        if conv is None or chain is None:
            return None
        data = bytes(data)
        if header.signed:
            try:
                verify_signature(data, conv.cid_bytes, chain.signer_key)
            except CryptoError:
                return False
            return True
        return chain.authentic(header.step, *header.sealed(data, conv.cid_bytes))

    def peek_receipt(
        self, cid: str, data: bytes, header: Header | None
    ) -> tuple[str, Receipt] | None:
        """See :meth:`Engine.peek_receipt`."""
        conv = self._convs.get(cid)
        try:
            header = header or read_header(data)
        except FieldchatError:
            return None
        chain = conv.recv.get(header.chain_id) if conv else None
        pids = conv.pids.get(header.epoch) if conv else None
        if header.kind is not EnvelopeKind.RECEIPT or conv is None or chain is None:
            return None
        if pids is None or header.sender >= len(pids):
            return None
        data = bytes(data)
        try:
            if header.signed:
                verify_signature(data, conv.cid_bytes, chain.signer_key)
            aead = _decrypt_signed if header.cover(data) else aead_open
            plaintext = chain.peek(header.step, *header.sealed(data, conv.cid_bytes), aead=aead)
            message = None
            if plaintext is not None:
                message = decode_plaintext(
                    header.kind, plaintext, compressed=header.compressed, padded=header.padded
                )
        except FieldchatError:  # CryptoError, WireError: not one to act on
            return None
        return (pids[header.sender], message) if isinstance(message, Receipt) else None

    def signature_jobs(self, envelopes: Sequence[tuple[str, bytes]]) -> list[SignatureJob]:
        """The signatures of ``envelopes`` that :meth:`open` would check (engine lock held)."""
        jobs: list[SignatureJob] = []
        for cid, raw in envelopes:
            conv = self._convs.get(cid)
            if conv is None:
                continue
            try:
                header = read_header(raw)
            except FieldchatError:
                continue
            chain = conv.recv.get(header.chain_id)
            if not header.signed or chain is None:
                continue
            jobs.append((bytes(raw), conv.cid_bytes, chain.signer_key))
        return jobs

    @staticmethod
    def verify_shared(jobs: list[SignatureJob], executor: Executor) -> list[tuple[bytes, bytes]]:
        """Check ``jobs``, half of them on ``executor`` (no lock needed: no state)."""
        theirs = executor.submit(_verify_all, jobs[1::2])
        return _verify_all(jobs[::2]) + theirs.result()

    def remember_verified(self, verified: list[tuple[bytes, bytes]]) -> None:
        """Remember what :meth:`verify_shared` verified, for :meth:`open` (lock held)."""
        self._preverified = dict(verified)

    def open(  # noqa: PLR0912, PLR0915
        self, cid: str, data: bytes, header: Header | None
    ) -> Opened | None:
        """See :meth:`Engine.open`."""
        # One function on purpose: this is the per-message path (PROTOCOL.md §6.4).
        conv = self._convs.get(cid)
        if conv is None or conv.epoch < 0:
            raise UnknownConversation(f"unknown conversation {cid[:40]}")
        if header is None:
            header = read_header(data)
        # The fields read once (the per-message path: a local is the cheapest read).
        kind, flags, epoch, sender_index, chain_no, step, _header_size = header
        data = bytes(data)
        pids = conv.pids.get(epoch)
        if pids is None:
            if epoch > conv.epoch:
                raise MissingKey(f"roster of epoch {epoch} not known yet")
            raise StaleEpoch(f"epoch {epoch} is no longer kept")
        if conv.removed and epoch >= conv.epoch:
            raise NotAMember(f"removed from {cid} at epoch {conv.epoch}")
        if sender_index >= len(pids):
            raise NotAMember(f"no member {sender_index} in {cid} at epoch {epoch}")
        sender = pids[sender_index]
        if sender == self._pid:
            self._counters["own"] += 1
            return None
        if epoch < conv.epoch and (conv.removed or sender not in conv.pids[conv.epoch]):
            raise StaleEpoch(f"{sender} was removed after epoch {epoch}")
        chain = conv.recv.get((epoch, sender_index, chain_no))
        if chain is None:
            if epoch < conv.epoch and self._pid not in pids:
                raise StaleEpoch(f"epoch {epoch} is from before we joined")
            raise MissingKey(f"no grant yet for {sender} in epoch {epoch}")
        signed = bool(flags & FLAG_SIGNED)
        cover = 0  # signed: the unsigned steps before it that it covers (§6.5)
        covered = False  # unsigned under a policy that signs: pending until covered
        if signed:
            cover = header.cover(data)
            # Verified before any chain step is derived (§6.4): a forged signature costs
            # one verification, whatever step it names.
            if self._preverified.pop(data, None) != chain.signer_key:
                verify_signature(data, conv.cid_bytes, chain.signer_key)
        else:
            if every := conv.sign_every[epoch]:
                if step % every == 0:
                    raise SignatureRequired("the conversation policy requires a signature")
                covered = True
            if epoch in conv.closed:
                # Someone removed since holds this epoch's chain keys (§6.4, §7).
                stated = conv.ends.get((epoch, sender_index, chain_no))
                if stated is None:
                    raise ChainEndUnknown(f"{sender} has not stated the end of epoch {epoch}")
                if step >= stated:
                    raise ChainClosed(
                        f"unsigned step {step} of epoch {epoch}: {sender} ended it at {stated}"
                    )
        ciphertext, aad = header.sealed(data, conv.cid_bytes)
        if cover or covered:
            chain_id = (epoch, sender_index, chain_no)
            coverage = self._coverage.get((cid, chain_id))
            if coverage is None:
                self._drop_stale_coverage()
                coverage = self._coverage[(cid, chain_id)] = ChainCoverage()
            self._coverage_dirty.add((cid, chain_id))
            if covered and coverage.pending(step):
                # Another candidate for a step still pending: kept if it authenticates,
                # since the covering signature tells which one the sender sent.
                if coverage.candidate(step, envelope_digest(data), ciphertext, aad):
                    self._counters["candidate_kept"] += 1
                    self._settle(cid, chain_id, sender, coverage.retry(step))
                else:
                    self._counters["duplicate"] += 1
                return None
            keep = _KeepKey(signed=bool(cover))
            plaintext = chain.open(step, ciphertext, aad, authenticated=signed, aead=keep)
            if plaintext is not None:
                if cover:
                    done = coverage.signed(step, cover, keep.key, ciphertext, aad)
                else:
                    done = coverage.unsigned(step, envelope_digest(data), keep.key)
                self._settle(cid, chain_id, sender, done)
        else:
            plaintext = chain.open(step, ciphertext, aad, authenticated=signed)
        if plaintext is None:
            self._counters["duplicate"] += 1
            return None
        if not chain.dirty:
            chain.dirty = True
            self._dirty.add((cid, (epoch, sender_index, chain_no)))
        self._opens_since_flush += 1
        if self._opens_since_flush >= AUTO_FLUSH_OPENS:
            self.flush()
        if flags & _CODED:  # most plaintexts are neither: skip the keywords
            message = decode_plaintext(
                kind, plaintext, compressed=header.compressed, padded=header.padded
            )
        else:
            message = decode_plaintext(kind, plaintext)
        return Opened(cid, sender, epoch, sender_index, chain_no, step, message, signed, covered)

    def flush(self) -> None:
        """Persist receiving-chain state changed since the last flush (batched writes),
        with the coverage entries changed since (in the same save, so a device's
        transaction holds the messages, their chains and their coverage together)."""
        writes: Writes = {}
        for cid, key in self._dirty:
            conv = self._convs.get(cid)
            chain = conv.recv.get(key) if conv else None
            if chain is not None:
                chain.dirty = False
                writes[recv_key(cid, key)] = recv_record(chain)
        coverage, self._coverage_writes = self._coverage_writes, {}
        if self._coverage_dirty:
            self._write_coverage(coverage)
            self._coverage_dirty.clear()
        writes.update(coverage)
        if writes:
            try:
                self._store.save(writes)
            except BaseException:
                self._unflushed(coverage)
                raise
            if coverage:  # memory stays ahead of a transaction that rolls back
                self._store.on_rollback(lambda: self._unflushed(coverage))
        self._dirty.clear()
        self._opens_since_flush = 0

    def _unflushed(self, coverage: Writes) -> None:
        """Coverage records that did not reach the disk: written at the next flush
        (unless a newer change of the same entry is due by then)."""
        self._coverage_writes = {**coverage, **self._coverage_writes}

    def _write_coverage(self, writes: Writes) -> None:
        """The records of the coverage entries changed since the last flush: one per
        pending step and per waiting signature, ``None`` for those settled or dropped."""
        for cid, chain_id in self._coverage_dirty:
            coverage = self._coverage.get((cid, chain_id))
            conv = self._convs.get(cid)
            if coverage is None or conv is None:
                continue
            steps, waiting = coverage.take_changes()
            for step in steps:
                entry = coverage.entry(step)
                record = None if entry is None else covered_record(chain_id, step, entry)
                writes[covered_key(cid, chain_id, step)] = record
            for step in waiting:
                signed = coverage.waiting.get(step)
                writes[covering_key(cid, chain_id, step)] = (
                    None if signed is None else covering_record(chain_id, signed, conv.cid_bytes)
                )
