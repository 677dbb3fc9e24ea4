"""The participants we know: their bundles, trusted on first use, and which of them
were verified out of band (PROTOCOL.md §2)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fieldchat.device._records import Writes, bundle_key, verified_key
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import Bundle
from fieldchat.schemas.errors import UnknownParticipant

__all__ = ["BundleStatus", "BundleUpdate", "Bundles"]


class BundleStatus(enum.Enum):
    NEW = "new"
    SAME = "same"
    UPDATED = "updated"  # a newer prekey (rotation, PROTOCOL.md §2.5): the same identity
    # The pid is the hash of the identity key, so a bundle of a pid cannot change it;
    # kept for callers that warn on it (a new pid is a new identity, compared anew).
    KEY_CHANGED = "key_changed"
    OLDER = "older"  # an older prekey than the one known: ignored (no rollback)


@dataclass(frozen=True, slots=True)
class BundleUpdate:
    pid: str
    status: BundleStatus
    fingerprint: str
    previous_fingerprint: str | None = None


class Bundles:
    """Known bundles by pid (ours included) and the pids verified out of band."""

    def __init__(self, own: Bundle, store: KeyStore) -> None:
        self.by_pid: dict[str, Bundle] = {own.pid: own}
        self.verified: set[str] = set()
        self._store = store

    def get(self, pid: str) -> Bundle | None:
        return self.by_pid.get(pid)

    def mark_verified(self, pid: str) -> None:
        """Raises: UnknownParticipant: no bundle known for ``pid``."""
        if pid not in self.by_pid:
            raise UnknownParticipant(f"no bundle known for {pid}")
        self.verified.add(pid)
        self._store.save({verified_key(pid): self.by_pid[pid].fingerprint().encode()})

    def learn(self, data: bytes) -> BundleUpdate:
        """Accept a bundle (see :meth:`Engine.learn_bundle`).

        Raises:
            WireError, CryptoError: malformed or badly signed bundle.
        """
        bundle = Bundle.from_bytes(data)
        known = self.by_pid.get(bundle.pid)
        if known is None:
            status = BundleStatus.NEW
        elif known == bundle:
            return BundleUpdate(bundle.pid, BundleStatus.SAME, bundle.fingerprint())
        elif bundle.prekey.id <= known.prekey.id:
            return BundleUpdate(bundle.pid, BundleStatus.OLDER, known.fingerprint())
        else:
            status = BundleStatus.UPDATED
        self.by_pid[bundle.pid] = bundle
        writes: Writes = {bundle_key(bundle.pid): data}
        if status is BundleStatus.KEY_CHANGED:
            writes[verified_key(bundle.pid)] = None
        self._store.save(writes)
        return BundleUpdate(
            bundle.pid, status, bundle.fingerprint(), known.fingerprint() if known else None
        )
