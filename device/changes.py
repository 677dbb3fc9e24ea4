"""The changes a device makes to its conversations and keys (``Device.create_conversation``,
``invite``, ``remove``, ``set_policy``, ``update``, ``leave``).

Each is the engine's change and the publications it produced (rosters, grants,
controls) in one transaction, so the outbox has them exactly when the change is
saved; then the topics of a conversation we changed are followed and the worker
wakes to publish. Runs on the application's thread, as the engine calls it makes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from fieldchat.device.context import Part, Shared
from fieldchat.device.rows import OutboxKind
from fieldchat.device.subscriptions import conversation_topics
from fieldchat.schemas import Policy
from fieldchat.schemas.errors import UnknownParticipant

if TYPE_CHECKING:
    from fieldchat.device.worker import Worker

__all__ = ["Changes"]


class Changes(Part):
    """A device's conversation and key changes (see the module); ``worker`` subscribes,
    waits and publishes."""

    def __init__(self, shared: Shared, worker: Worker) -> None:
        super().__init__(shared)
        self._worker = worker

    def fetch_bundles(self, pids: Iterable[str], timeout: float) -> None:
        """Learn the bundles of ``pids`` (retained on ``p/{pid}/bundle``).

        Raises:
            UnknownParticipant: a bundle did not arrive in time.
        """
        missing = [p for p in dict.fromkeys(pids) if self.engine.bundle_of(p) is None]
        if not missing:
            return
        self._worker.subscribe([self.topics.bundle(p) for p in missing])
        self._worker.wait_for(lambda: all(self.engine.bundle_of(p) for p in missing), timeout)
        absent = [p for p in missing if self.engine.bundle_of(p) is None]
        if absent:
            raise UnknownParticipant(
                f"no bundle for {absent[0]} within {timeout:g} s: has that device "
                f"connected to this broker once?"
            )

    def create(self, members: Sequence[str], policy: Policy | None, timeout: float) -> str:
        """A new conversation with ``members``; its cid."""
        self.fetch_bundles(members, timeout)
        with self.state.transaction() as tx:
            cid, pubs = self.engine.create_conversation(members, policy=policy)
            self.queue_publications(tx, pubs, cid)
        self._follow(cid)
        return cid

    def invite(self, cid: str, pids: Sequence[str], timeout: float) -> None:
        self.engine.roster(cid)
        self.fetch_bundles(pids, timeout)
        with self.state.transaction() as tx:
            self.queue_publications(tx, self.engine.add_members(cid, pids), cid)
        self._follow(cid)

    def remove(self, cid: str, pids: Sequence[str]) -> None:
        with self.state.transaction() as tx:
            self.queue_publications(tx, self.engine.remove_members(cid, pids), cid)
        self._worker.wake()

    def set_policy(self, cid: str, policy: Policy) -> None:
        with self.state.transaction() as tx:
            self.queue_publications(tx, self.engine.set_policy(cid, policy), cid)
        self._worker.wake()

    def update(self) -> None:
        with self.state.transaction() as tx:
            self.queue_publications(tx, self.engine.update(), None)
        self._worker.wake()

    def leave(self, cid: str) -> None:
        roster = self.engine.roster(cid)
        with self.state.transaction() as tx:
            if roster.is_admin(self.pid) and len(roster.pids) > 1:
                pubs = self.engine.remove_members(cid, [self.pid])
                self.queue_publications(tx, pubs, cid)
            else:
                self.queue_own(tx, cid, self.engine.leave(cid), OutboxKind.MSG)
        self._worker.wake()

    def _follow(self, cid: str) -> None:
        """Subscribe to a conversation we just changed, after its roster is published."""
        roster = self.engine.roster(cid)
        self._worker.subscriptions.follow(
            conversation_topics(self.topics, cid, roster.pids, self.pid)
        )
        self._worker.wake()
