"""Sender-key chains: one per sender, epoch and chain number (PROTOCOL.md §6.2).

Step *i* of a chain with key ``CK_i`` gives

    message key_i || CK_{i+1} = HMAC-SHA512("fieldchat chain step v1", CK_i)
    nonce_i                   = i as 12 bytes, big-endian

one HMAC per step, in HKDF-Extract form (label as salt, chain key as input keying
material; see ``schemas.crypto.chain_step``). Signal's symmetric ratchet makes two
HMAC-SHA256 calls for the same 64 bytes.
Every message key is used for exactly one message, so the nonce only has to be
unique per key; deriving it from the step keeps it off the wire. Old chain keys are
dropped as the chain advances, so a key stolen later cannot open earlier messages.
A step is never reused because the sender persists a reservation before using it
(see ``SendChain``).

Work before authentication is bounded (PROTOCOL.md §6.4): a receiver derives at most
MAX_UNSIGNED_JUMP chain steps for an envelope that nothing has authenticated yet (an
unsigned one; a signed one is verified before any derivation). Keys derived on the
way are cached every MARK_EVERY steps (``RecvChain.marks``), at most MAX_FORWARD_JUMP
ahead of the chain: junk can make a receiver derive that far once per chain position,
then any envelope costs at most MARK_EVERY steps; an honest sender far ahead is
reached MAX_UNSIGNED_JUMP steps per envelope it sends.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fieldchat.schemas.crypto import aead_open, chain_step
from fieldchat.schemas.errors import (
    CryptoError,
    ForwardJumpTooLarge,
    SkippedKeyMissing,
    UnsignedJumpTooFar,
)

__all__ = [
    "MARK_EVERY",
    "MAX_FORWARD_JUMP",
    "MAX_SKIPPED_KEYS",
    "MAX_UNSIGNED_JUMP",
    "RESERVE_STEPS",
    "Aead",
    "RecvChain",
    "SendChain",
    "advance",
    "nonce",
    "step_keys",
]

Aead = Callable[[bytes, bytes, bytes, bytes], bytes]
"""``(message key, nonce, ciphertext || tag, associated data) -> plaintext``: how a
receiving chain opens an envelope (:func:`~fieldchat.schemas.crypto.aead_open`)."""

MAX_SKIPPED_KEYS = 2_000  # per receiving chain, as libsignal's MAX_MESSAGE_KEYS
MAX_FORWARD_JUMP = 25_000  # as libsignal's MAX_FORWARD_JUMPS
# Steps derived for one envelope before it is authenticated: a chain step costs
# 0.85-1.5 µs here (bench/envelope.py), so ≤ 0.8 ms; a receiver's CPU per forged
# envelope stays under ~1 ms (issue 13, item 5). Far below the 25,000 of a signed jump.
MAX_UNSIGNED_JUMP = 512
MARK_EVERY = 64  # derived chain keys cached at steps divisible by this (RecvChain.marks)
RESERVE_STEPS = 64  # steps a sender reserves per key-store write


def step_keys(chain_key: bytes) -> tuple[bytes, bytes]:
    """``(message key, next chain key)`` of the step whose chain key is ``chain_key``."""
    out = chain_step(chain_key)
    return out[:32], out[32:]


def nonce(step: int) -> bytes:
    """The AES-GCM nonce of ``step`` (unique per message key, which is single-use)."""
    return step.to_bytes(12, "big")


def advance(chain_key: bytes, steps: int = 1) -> bytes:
    """The chain key ``steps`` steps later."""
    for _ in range(steps):
        chain_key = chain_step(chain_key)[32:]
    return chain_key


@dataclass(slots=True)
class SendChain:
    """Our own sending chain in one epoch.

    ``key`` is the chain key at step ``reserved``; the message keys of steps
    ``step .. reserved-1`` wait in ``ahead``. Before a step at or past
    ``reserved`` is used, the engine persists the next reservation
    ``(reserved + RESERVE_STEPS, CK at that step)`` (:meth:`plan`, then
    :meth:`commit`). After a crash the chain resumes at the persisted reservation,
    skipping unused reserved steps rather than ever reusing one, and the disk never
    holds a key for a step already sent (forward secrecy).
    """

    epoch: int
    chain: int
    step: int
    key: bytes
    reserved: int
    ahead: deque[bytes] = field(default_factory=deque)

    def needs_reservation(self) -> bool:
        return self.step >= self.reserved

    def plan(self) -> tuple[int, bytes, list[bytes]]:
        """Compute the next reservation ``(until, CK at until, message keys)``."""
        keys = []
        ck = self.key
        for _ in range(RESERVE_STEPS):
            key, ck = step_keys(ck)
            keys.append(key)
        return self.reserved + RESERVE_STEPS, ck, keys

    def commit(self, until: int, chain_key: bytes, keys: list[bytes]) -> None:
        """Adopt a reservation once it is persisted."""
        self.ahead.extend(keys)
        self.key = chain_key
        self.reserved = until

    def forget(self, reserved: int, chain_key: bytes) -> None:
        """Give up reservations past ``reserved`` (whose chain key is ``chain_key``):
        their write rolled back, so the disk still says ``reserved``.

        Steps already used stay used (what they sealed was rolled back too, never
        published), so nothing is sealed twice even in memory; if they went past
        ``reserved``, the chain waits at its current step with no step reserved, and
        the next :meth:`plan` persists from there.
        """
        if self.step >= reserved:
            self.key = advance(chain_key, self.step - reserved)
            self.reserved = self.step
            self.ahead.clear()
        else:
            for _ in range(self.reserved - reserved):
                self.ahead.pop()
            self.key = chain_key
            self.reserved = reserved

    def next_key(self) -> tuple[int, bytes, bytes]:
        """Use the current step: ``(step, message key, nonce)``; needs a reservation."""
        step = self.step
        self.step = step + 1
        return step, self.ahead.popleft(), nonce(step)


@dataclass(slots=True)
class RecvChain:
    """A chain granted to us by another member.

    ``skipped`` keeps the chain keys of steps passed over (out-of-order delivery),
    oldest first, at most MAX_SKIPPED_KEYS; ``evicted`` is the highest step whose
    key fell out of the window, which tells an evicted step from a duplicate.

    ``marks`` caches chain keys ahead of ``step`` (at steps divisible by MARK_EVERY,
    ascending, contiguous), derived while trying envelopes not authenticated yet. Not
    persisted: a cache, holding nothing the chain key does not already give.
    """

    epoch: int
    sender: int
    chain: int
    step: int
    key: bytes
    signer_key: bytes
    skipped: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    evicted: int = -1
    dirty: bool = False  # changed since the engine last persisted it
    marks: list[tuple[int, bytes]] = field(default_factory=list)

    def reach(self) -> int:
        """The furthest step an unsigned envelope may have to be tried now: at most
        MAX_UNSIGNED_JUMP steps beyond the chain or its furthest cached key."""
        return max(self.step, self.marks[-1][0] if self.marks else 0) + MAX_UNSIGNED_JUMP

    def open(
        self,
        step: int,
        sealed: bytes,
        aad: bytes,
        *,
        authenticated: bool = False,
        aead: Aead = aead_open,
    ) -> bytes | None:
        """Decrypt the envelope of ``step``; ``None`` when it was already opened.

        The chain moves (and skipped keys are stored) only after AES-GCM has
        authenticated the envelope, so forged envelopes cannot move it.
        ``authenticated``: its signature was verified, so it may jump up to
        MAX_FORWARD_JUMP steps; otherwise at most MAX_UNSIGNED_JUMP steps are
        derived for it (from the chain or a cached key). ``aead``: how the message key
        opens it (the default, AES-GCM; the opener passes one that also keeps the key,
        for delayed authentication, PROTOCOL.md §6.5).

        Raises:
            ForwardJumpTooLarge: ``step`` is more than MAX_FORWARD_JUMP ahead.
            UnsignedJumpTooFar: unsigned and beyond :meth:`reach` (hold and retry; the
                cache was extended towards it by up to MAX_UNSIGNED_JUMP steps).
            SkippedKeyMissing: ``step`` is behind and its key left the window.
            CryptoError: the envelope does not authenticate.
        """
        if step == self.step:  # in order: the common case
            out = chain_step(self.key)
            plaintext = aead(out[:32], step.to_bytes(12, "big"), sealed, aad)
            self.key = out[32:]
            self.step = step + 1
            if self.marks and self.marks[0][0] <= step:
                self._drop_marks()
            return plaintext
        if step > self.step:
            return self._open_ahead(step, sealed, aad, authenticated=authenticated, aead=aead)
        skipped_key = self.skipped.get(step)
        if skipped_key is None:
            if step <= self.evicted:
                raise SkippedKeyMissing(f"step {step} is older than the skipped-key window")
            return None
        plaintext = aead(chain_step(skipped_key)[:32], nonce(step), sealed, aad)
        del self.skipped[step]
        return plaintext

    def authentic(self, step: int, sealed: bytes, aad: bytes) -> bool | None:
        """Whether the envelope of ``step`` authenticates, changing nothing; ``None``
        when that cannot be told cheaply (beyond :meth:`reach`, or behind with no key).

        For a client that holds an envelope back for display order: only what is
        genuine is held, so junk aimed at a step cannot stand in for the envelope
        that comes later (at most MAX_UNSIGNED_JUMP steps derived, as for opening).
        """
        key = self._peek_key(step)
        if key is None:
            return None
        try:
            aead_open(key, nonce(step), sealed, aad)
        except CryptoError:
            return False
        return True

    def peek(self, step: int, sealed: bytes, aad: bytes, *, aead: Aead = aead_open) -> bytes | None:
        """The plaintext of ``step``, changing nothing (the envelope is opened for
        good later, in its turn); ``None`` when it cannot be told cheaply or does not
        authenticate. For the one message a held envelope must act on at once: a gap
        request (device.client.Device, MISSING receipts)."""
        key = self._peek_key(step)
        if key is None:
            return None
        try:
            return aead(key, nonce(step), sealed, aad)
        except CryptoError:
            return None

    def _peek_key(self, step: int) -> bytes | None:
        """The message key of ``step`` derived without storing anything."""
        if step == self.step:
            return chain_step(self.key)[:32]
        if step > self.step:
            if step - self.step > MAX_FORWARD_JUMP:
                return None
            base, ck = self._key_before(step)
            if step - base > MAX_UNSIGNED_JUMP:
                return None
            for _ in range(base, step):
                ck = chain_step(ck)[32:]
            return chain_step(ck)[:32]
        skipped_key = self.skipped.get(step)
        return None if skipped_key is None else chain_step(skipped_key)[:32]

    def _open_ahead(
        self, step: int, sealed: bytes, aad: bytes, *, authenticated: bool, aead: Aead
    ) -> bytes:
        jump = step - self.step
        if jump > MAX_FORWARD_JUMP:
            raise ForwardJumpTooLarge(f"step {step} is {jump} ahead of the chain")
        base, ck = self._key_before(step)
        if not authenticated and step - base > MAX_UNSIGNED_JUMP:
            self._push(step)
            raise UnsignedJumpTooFar(
                f"unsigned step {step} is {jump} ahead of the chain (at most "
                f"{MAX_UNSIGNED_JUMP} derived before authentication)"
            )
        # Keys of the steps passed over that the window will keep, collected on the way.
        low = max(self.step, step - MAX_SKIPPED_KEYS)
        passed: list[tuple[int, bytes]] = []
        for s in range(base, step):
            if s >= low:
                passed.append((s, ck))
            if s % MARK_EVERY == 0 and s > base:
                self._mark(s, ck)  # junk aimed here again costs at most MARK_EVERY steps
            ck = chain_step(ck)[32:]
        out = chain_step(ck)
        plaintext = aead(out[:32], nonce(step), sealed, aad)
        # Authenticated from here on.
        if base > low:  # the walk began at a cached key past the window's start
            passed = self._keys(low, base) + passed
        skipped = self.skipped
        for s, key in passed:
            skipped[s] = key
        if low > self.step:
            self.evicted = max(self.evicted, low - 1)
        while len(skipped) > MAX_SKIPPED_KEYS:
            old, _ = skipped.popitem(last=False)
            self.evicted = max(self.evicted, old)
        self.key = out[32:]
        self.step = step + 1
        self._drop_marks()
        return plaintext

    def _key_before(self, step: int) -> tuple[int, bytes]:
        """The known chain key nearest below (or at) ``step``: ``(its step, key)``."""
        i = bisect_right(self.marks, (step, b"\xff" * 33))
        if i and self.marks[i - 1][0] >= self.step:
            return self.marks[i - 1]
        return self.step, self.key

    def _keys(self, low: int, high: int) -> list[tuple[int, bytes]]:
        """``(step, chain key)`` of the steps ``low .. high-1`` (after authentication)."""
        base, ck = self._key_before(low)
        out = []
        for s in range(base, high):
            if s >= low:
                out.append((s, ck))
            ck = chain_step(ck)[32:]
        return out

    def _mark(self, step: int, ck: bytes) -> None:
        i = bisect_right(self.marks, (step, b""))
        if i < len(self.marks) and self.marks[i][0] == step:
            return
        insort(self.marks, (step, ck))

    def _push(self, step: int) -> None:
        """Extend the cached keys towards ``step`` by at most MAX_UNSIGNED_JUMP steps,
        never past MAX_FORWARD_JUMP ahead of the chain (there, nothing is derived).

        Every envelope out of reach extends them, whatever step it names: a step
        remembered as "already tried" would let one forged envelope far ahead stop an
        honest sender's later envelopes from ever being reached.
        """
        base, ck = self.marks[-1] if self.marks else (self.step, self.key)
        end = min(base + MAX_UNSIGNED_JUMP, step, self.step + MAX_FORWARD_JUMP)
        for s in range(base, end + 1):
            if s % MARK_EVERY == 0 and s > base:
                self.marks.append((s, ck))
            ck = chain_step(ck)[32:]

    def _drop_marks(self) -> None:
        """Forget cached keys the chain has passed."""
        i = bisect_right(self.marks, (self.step, b""))
        del self.marks[:i]
