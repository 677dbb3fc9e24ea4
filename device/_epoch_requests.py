"""UPDATE and REKEY requests an admin answers with a new epoch (PROTOCOL.md §6.7).

Pure bookkeeping, no keys and no I/O: who asked in which conversation, for which
prekey, and when this admin last answered there. The engine turns a conversation whose
turn came into a new epoch (``Membership.set_policy``).
"""

from __future__ import annotations

from collections.abc import Callable

from fieldchat.schemas import Bundle

__all__ = ["UPDATE_EPOCH_EVERY_S", "EpochRequests", "Wanted"]

# An admin issues at most one epoch per conversation this often for UPDATE and REKEY
# requests: each costs a roster and n-1 deliveries (≈ 1.3 KB a member), and any member
# can send requests, so unbounded answers would let one member spend everyone's
# airtime. Requests arriving meanwhile wait and are answered together.
UPDATE_EPOCH_EVERY_S = 60.0

Wanted = tuple[int, bytes] | None
"""The prekey (id, digest) an UPDATE names, which the new secret must go to; None for
a REKEY (any prekey)."""


class EpochRequests:
    """Requests waiting per conversation: cid -> sender -> the prekey it wants."""

    def __init__(self, bundle_of: Callable[[str], Bundle | None]) -> None:
        self._bundle_of = bundle_of
        self._asked: dict[str, dict[str, Wanted]] = {}
        self._answered_at: dict[str, float] = {}

    def ask(self, cid: str, sender: str, want: Wanted, now: float) -> bool:
        """Record ``sender``'s request; whether it waits for the conversation's turn."""
        self._asked.setdefault(cid, {})[sender] = want
        return self._answered_lately(cid, now)

    def due(self, now: float) -> bool:
        """Whether :meth:`take` would give a conversation now."""
        return any(
            not self._answered_lately(cid, now) and any(map(self._ready, asked.items()))
            for cid, asked in self._asked.items()
        )

    def take(self, now: float, admin_in: Callable[[str], bool]) -> list[str]:
        """The conversations to issue a new epoch in now, their answered requests
        forgotten. An UPDATE waits until we hold the bundle with the prekey it names,
        so the new secret never goes to the old, perhaps stolen, prekey; requests of a
        conversation where we are no longer an admin are dropped."""
        out: list[str] = []
        for cid, asked in list(self._asked.items()):
            if not admin_in(cid):
                del self._asked[cid]
                continue
            if self._answered_lately(cid, now):
                continue
            ready = [pid for pid, want in asked.items() if self._ready((pid, want))]
            if not ready:
                continue
            for pid in ready:
                del asked[pid]
            if not asked:
                del self._asked[cid]
            self._answered_at[cid] = now
            out.append(cid)
        return out

    def _answered_lately(self, cid: str, now: float) -> bool:
        last = self._answered_at.get(cid)
        return last is not None and now - last < UPDATE_EPOCH_EVERY_S

    def _ready(self, item: tuple[str, Wanted]) -> bool:
        pid, want = item
        if want is None:
            return True
        bundle = self._bundle_of(pid)
        if bundle is None or bundle.prekey.id < want[0]:
            return False
        return bundle.prekey.id > want[0] or bundle.prekey.digest() == want[1]
