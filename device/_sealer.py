"""Sealing our messages, and the reservations that keep every step used once
(PROTOCOL.md §3, §6.3).

Steps are reserved in windows persisted before use: a crash resumes at the
reservation, skipping unused steps rather than ever reusing a key or nonce. A clean
stop (:meth:`Sealer.park`) keeps the unused steps for the next start instead.

With ``sign_every`` = N, each signed envelope covers the unsigned ones sealed just
before it on the same chain (PROTOCOL.md §6.5): their digests enter its associated
data and its header counts them (``cover``). That state is in memory: after a
restart the first signed envelope covers only what was sealed since.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from fieldchat.device._conversation import Conversation, Conversations
from fieldchat.device._records import (
    SENT_COVER_PREFIX,
    Writes,
    send_record,
    sent_cover_key,
    sent_cover_record,
    unused_steps_key,
    unused_steps_record,
)
from fieldchat.device.chains import SendChain
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import Message, encode_plaintext
from fieldchat.schemas._codec import fields, unpack
from fieldchat.schemas.envelope import MAX_COVER, coverage_digest, envelope_digest, seal_envelope
from fieldchat.schemas.errors import EpochKeyPending, KeyStoreError, NotAMember, WireError
from fieldchat.schemas.messages import Control, kind_of

__all__ = ["Sealer"]


@dataclass(slots=True)
class _Covering:
    """The unsigned envelopes a chain sealed since its last signed one (§6.5)."""

    chain: SendChain
    next_step: int
    digests: list[bytes] = field(default_factory=list)


class Sealer:
    """Our sending chains: seal, reserve ahead, park at a clean stop.

    ``lock``: the engine's, taken by the store's rollback callback (it runs outside
    any engine call).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        store: KeyStore,
        conversations: Conversations,
        lock: threading.RLock,
    ) -> None:
        self._identity = identity
        self._store = store
        self._conversations = conversations
        self._lock = lock
        self._parked = False  # park() ran: nothing more may be sealed
        self._covering: dict[str, _Covering] = {}

    def seal(self, cid: str, message: Message, force_sign: bool = False) -> bytes:
        """See :meth:`Engine.seal`. ``force_sign``: whatever the policy; controls other
        than JOINED always are (``ControlOp.signed_only``, §6.5)."""
        if isinstance(message, Control) and message.op.signed_only:
            force_sign = True
        if self._parked:
            raise KeyStoreError("the engine stopped (parked at close): open it again to send")
        conv = self._conversations.joined(cid)
        chain = conv.send
        headers = conv.headers
        if conv.removed:
            raise NotAMember(f"not a member of {cid}")
        if chain is None or headers is None:
            raise EpochKeyPending(f"epoch {conv.epoch} of {cid}: its secret has not arrived")
        if chain.step >= chain.reserved:
            self._reserve(conv, chain)
        policy = conv.rosters[conv.epoch].policy
        if policy.compress or policy.pad:
            plaintext, compressed, padded = encode_plaintext(
                message, compress=policy.compress, pad=policy.pad
            )
        else:
            plaintext, compressed, padded = encode_plaintext(message)
        step, key, nonce = chain.next_key()
        every = policy.sign_every
        if every <= 1:  # 1 (the default): all signed; 0: none. Nothing is covered.
            signed = every == 1 or force_sign
            header = headers.encode(
                kind_of(message), step, signed=signed, compressed=compressed, padded=padded
            )
            sign = self._identity.sign if signed else None
            return seal_envelope(header, conv.cid_bytes, key, nonce, plaintext, sign)
        covering = self._covering.get(cid)
        if covering is None or covering.chain is not chain or covering.next_step != step:
            # A new chain, or steps skipped (a restart): cover from here on.
            covering = self._covering[cid] = _Covering(chain, step)
        covering.next_step = step + 1
        if force_sign or step % every == 0:
            header = headers.encode(
                kind_of(message),
                step,
                signed=True,
                compressed=compressed,
                padded=padded,
                cover=len(covering.digests),
            )
            coverage = coverage_digest(covering.digests)
            covering.digests = []
            return seal_envelope(
                header, conv.cid_bytes, key, nonce, plaintext, self._identity.sign, coverage
            )
        header = headers.encode(
            kind_of(message), step, signed=False, compressed=compressed, padded=padded
        )
        envelope = seal_envelope(header, conv.cid_bytes, key, nonce, plaintext)
        covering.digests.append(envelope_digest(envelope))
        return envelope

    def reservations_low(self, left: int) -> bool:
        """See :meth:`Engine.reservations_low`."""
        return any(
            conv.send is not None and 0 < conv.send.reserved - conv.send.step <= left
            for conv in self._conversations.by_cid.values()
            if not conv.removed
        )

    def renew_reservations(self, left: int) -> int:
        """See :meth:`Engine.renew_reservations`."""
        renewed = 0
        for conv in self._conversations.by_cid.values():
            chain = conv.send
            if chain is None or conv.removed or not 0 < chain.reserved - chain.step <= left:
                continue
            self._reserve(conv, chain)
            renewed += 1
        return renewed

    def park(self) -> int:
        """See :meth:`Engine.park`."""
        self._parked = True
        items: Writes = {}
        parked = 0
        for conv in self._conversations.by_cid.values():
            chain = conv.send
            if chain is None or conv.removed:
                continue
            if chain.ahead:
                items[unused_steps_key(conv.cid)] = unused_steps_record(chain)
                parked += 1
            covering = self._covering.get(conv.cid)
            if covering is not None and covering.chain is chain and covering.digests:
                items[sent_cover_key(conv.cid)] = sent_cover_record(chain, covering.digests)
        if items:
            self._store.save(items)
        return parked

    def adopt_parked_cover(self, counters: Counter[str]) -> None:
        """What :meth:`park` kept of our unsigned envelopes, where the chain resumes at
        the very next step (a clean stop): the next signed envelope covers them too
        (§6.5). After a crash the chain resumes past a gap and cannot cover them; they
        stay pending. The records are deleted before anything is sealed. A malformed
        one is counted ``corrupt_record`` and dropped."""
        parked = self._store.load_prefix(SENT_COVER_PREFIX)
        if not parked:
            return
        for key, raw in parked.items():
            cid = key.split("/", 1)[1]
            conv = self._conversations.get(cid)
            chain = conv.send if conv is not None and not conv.removed else None
            try:
                epoch, chain_no, step, digests = _parked_cover(raw)
            except WireError:
                counters["corrupt_record"] += 1
                continue
            if chain is not None and (epoch, chain_no, step) == (
                chain.epoch,
                chain.chain,
                chain.step,
            ):
                self._covering[cid] = _Covering(chain, chain.step, digests)
        self._store.save(dict.fromkeys(parked))

    def _reserve(self, conv: Conversation, chain: SendChain) -> None:
        """Persist the chain's next reservation, then use it (§6.3).

        The write may join a transaction of the caller's that later fails (a full
        disk at the next row): the store then undoes the adoption with it, so memory
        never uses steps past a reservation the disk does not hold, which a restart
        would hand out again.
        """
        until, chain_key, keys = chain.plan()
        self._store.save(send_record(conv, (until, chain_key)))
        persisted = chain.reserved, chain.key
        chain.commit(until, chain_key, keys)
        self._store.on_rollback(lambda: self._forget_reservation(chain, *persisted))

    def _forget_reservation(self, chain: SendChain, reserved: int, chain_key: bytes) -> None:
        with self._lock:
            chain.forget(reserved, chain_key)


def _parked_cover(raw: bytes) -> tuple[object, object, object, list[bytes]]:
    """A sent-cover record's fields (:func:`_records.sent_cover_record`).

    Raises:
        WireError: not one, or not 1 to MAX_COVER 32-byte digests.
    """
    epoch, chain_no, step, digests = fields(unpack(raw, "sent cover"), 4, "sent cover")
    if not (
        isinstance(digests, tuple)
        and 0 < len(digests) <= MAX_COVER
        and all(isinstance(d, bytes) and len(d) == 32 for d in digests)
    ):
        raise WireError("sent cover: not a list of 32-byte digests")
    return epoch, chain_no, step, list(digests)
