"""Sender-key chains: one per sender, epoch and chain number (PROTOCOL.md §6.2).

Step *i* of a chain with key ``CK_i`` gives

    message key  = HKDF-Expand(CK_i, "fc msg key", 32)
    nonce        = HKDF-Expand(CK_i, "fc msg nonce", 12)
    CK_{i+1}     = HKDF-Expand(CK_i, "fc chain next", 32)

(one-block HKDF-Expand is ``HMAC-SHA256(CK, label || 0x01)``). Old chain keys are
dropped as the chain advances, so a key stolen later cannot open earlier messages.
No nonce travels: the step in the header is enough, and a step is never reused
because the sender persists a reservation before using it (see ``SendChain``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from schemas.crypto import hmac_sha256
from schemas.errors import ForwardJumpTooLarge, SkippedKeyMissing

__all__ = [
    "MAX_FORWARD_JUMP",
    "MAX_SKIPPED_KEYS",
    "RESERVE_STEPS",
    "RecvChain",
    "SendChain",
    "advance",
    "message_key",
]

MAX_SKIPPED_KEYS = 2_000  # per receiving chain, as libsignal's MAX_MESSAGE_KEYS
MAX_FORWARD_JUMP = 25_000  # as libsignal's MAX_FORWARD_JUMPS
RESERVE_STEPS = 64  # steps a sender reserves per key-store write

_KEY = b"fc msg key\x01"
_NONCE = b"fc msg nonce\x01"
_NEXT = b"fc chain next\x01"


def message_key(chain_key: bytes) -> tuple[bytes, bytes]:
    """``(AES-256 key, 96-bit nonce)`` of the step whose chain key is ``chain_key``."""
    return hmac_sha256(chain_key, _KEY), hmac_sha256(chain_key, _NONCE)[:12]


def advance(chain_key: bytes, steps: int = 1) -> bytes:
    """The chain key ``steps`` steps later."""
    for _ in range(steps):
        chain_key = hmac_sha256(chain_key, _NEXT)
    return chain_key


@dataclass(slots=True)
class SendChain:
    """Our own sending chain in one epoch.

    ``reserved`` is the first step not yet covered by the key store: before step
    ``reserved`` is used, the store must hold ``(reserved + RESERVE_STEPS,
    CK at that step)``. After a crash the chain resumes there, skipping the unused
    reserved steps rather than ever reusing one.
    """

    epoch: int
    chain: int
    step: int
    key: bytes
    reserved: int

    def needs_reservation(self) -> bool:
        return self.step >= self.reserved

    def reservation(self) -> tuple[int, bytes]:
        """The next reservation point ``(step, chain key)`` to persist."""
        until = self.step + RESERVE_STEPS
        return until, advance(self.key, until - self.step)

    def next_key(self) -> tuple[int, bytes, bytes]:
        """Use the current step: ``(step, message key, nonce)``, then advance."""
        step = self.step
        key, nonce = message_key(self.key)
        self.key = hmac_sha256(self.key, _NEXT)
        self.step = step + 1
        return step, key, nonce


@dataclass(slots=True)
class RecvChain:
    """A chain granted to us by another member.

    ``skipped`` keeps the chain keys of steps passed over (out-of-order delivery),
    oldest first, at most MAX_SKIPPED_KEYS; ``evicted`` is the highest step whose
    key fell out of the window, which tells an evicted step from a duplicate.
    """

    epoch: int
    sender: int
    chain: int
    step: int
    key: bytes
    signer_key: bytes
    skipped: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    evicted: int = -1

    def key_for(self, step: int) -> tuple[bytes, bytes, Commit] | None:
        """Keys for ``step`` without changing state; ``None`` for a duplicate.

        The returned commit is applied only after the envelope authenticates, so
        forged envelopes cannot move the chain.

        Raises:
            ForwardJumpTooLarge: ``step`` is more than MAX_FORWARD_JUMP ahead.
            SkippedKeyMissing: ``step`` is behind and its key left the window.
        """
        if step >= self.step:
            jump = step - self.step
            if jump > MAX_FORWARD_JUMP:
                raise ForwardJumpTooLarge(f"step {step} is {jump} ahead of the chain")
            ck = self.key
            passed: list[tuple[int, bytes]] = []
            for s in range(self.step, step):
                passed.append((s, ck))
                ck = hmac_sha256(ck, _NEXT)
            key, nonce = message_key(ck)
            return key, nonce, Commit(self, step, hmac_sha256(ck, _NEXT), passed)
        ck = self.skipped.get(step)
        if ck is None:
            if step <= self.evicted:
                raise SkippedKeyMissing(f"step {step} is older than the skipped-key window")
            return None
        key, nonce = message_key(ck)
        return key, nonce, Commit(self, step, None, [])


@dataclass(slots=True)
class Commit:
    """A pending state change of a :class:`RecvChain` (see ``RecvChain.key_for``)."""

    chain: RecvChain
    step: int
    next_key: bytes | None
    passed: list[tuple[int, bytes]]

    def apply(self) -> None:
        chain = self.chain
        if self.next_key is None:
            del chain.skipped[self.step]
            return
        skipped = chain.skipped
        for s, ck in self.passed:
            skipped[s] = ck
        while len(skipped) > MAX_SKIPPED_KEYS:
            old, _ = skipped.popitem(last=False)
            chain.evicted = max(chain.evicted, old)
        chain.key = self.next_key
        chain.step = self.step + 1
