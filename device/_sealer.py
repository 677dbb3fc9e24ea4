"""Sealing our messages, and the reservations that keep every step used once
(PROTOCOL.md §3, §6.3).

Steps are reserved in windows persisted before use: a crash resumes at the
reservation, skipping unused steps rather than ever reusing a key or nonce. A clean
stop (:meth:`Sealer.park`) keeps the unused steps for the next start instead.
"""

from __future__ import annotations

import threading

from fieldchat.device._conversation import Conversation, Conversations
from fieldchat.device._records import Writes, send_record, unused_steps_key, unused_steps_record
from fieldchat.device.chains import SendChain
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import Message, encode_plaintext
from fieldchat.schemas.envelope import seal_envelope
from fieldchat.schemas.errors import EpochKeyPending, KeyStoreError, NotAMember
from fieldchat.schemas.messages import kind_of

__all__ = ["Sealer"]


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

    def seal(self, cid: str, message: Message, force_sign: bool = False) -> bytes:
        """See :meth:`Engine.seal`. ``force_sign``: whatever the policy (ENDS, §6.5)."""
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
        signed = force_sign or (policy.sign_every != 0 and step % policy.sign_every == 0)
        header = headers.encode(
            kind_of(message), step, signed=signed, compressed=compressed, padded=padded
        )
        sign = self._identity.sign if signed else None
        return seal_envelope(header, conv.cid_bytes, key, nonce, plaintext, sign)

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
        for conv in self._conversations.by_cid.values():
            chain = conv.send
            if chain is None or conv.removed or not chain.ahead:
                continue
            items[unused_steps_key(conv.cid)] = unused_steps_record(chain)
        if items:
            self._store.save(items)
        return len(items)

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
