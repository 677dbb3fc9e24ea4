"""The application's side of a device, apart from its threads: sealing texts into the
outbox on the caller's thread (:class:`TextQueue`), and what the application reads
about its conversations and peers (:func:`conversation_infos`, :func:`fingerprint_of`).
:class:`fieldchat.device.client.Device` keeps the public methods and delegates here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fieldchat.device import idempotency
from fieldchat.device.engine import Engine
from fieldchat.device.rows import OutboxKind
from fieldchat.device.state import DeviceState
from fieldchat.schemas import Policy, TextMessage, Topics
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.errors import ConfigError, UnknownConversation, UnknownParticipant

__all__ = [
    "ConversationInfo",
    "SentMessage",
    "TextQueue",
    "conversation_infos",
    "fingerprint_of",
    "same_fingerprint",
    "undelivered_count",
]


@dataclass(frozen=True, slots=True)
class SentMessage:
    """An own message, durable in the outbox: ``id`` in ``sent``, its chain position.
    ``replayed``: a send with an idempotency key used before returned the first one's."""

    id: int
    cid: str
    epoch: int
    chain: int
    step: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    cid: str
    epoch: int
    members: tuple[str, ...]
    admins: tuple[str, ...]
    member: bool
    policy: Policy | None


class TextQueue:
    """Seals texts into the outbox and ``sent`` in one transaction, on the caller's
    thread (one caller at a time: steps are drawn in outbox order)."""

    def __init__(
        self,
        engine: Engine,
        state: DeviceState,
        topics: Topics,
        clock: Callable[[], float],
        *,
        power_safe: bool,
    ) -> None:
        self.engine = engine
        self.state = state
        self.topics = topics
        self.clock = clock
        self.power_safe = power_safe
        self._lock = threading.Lock()

    def queue(
        self, cid: str, texts: Sequence[str], *, key: str | None = None
    ) -> tuple[list[SentMessage], bool]:
        """The rows written, and whether they must be synced before the caller returns
        (``power_safe``, or a chain reservation was written with them). With an
        idempotency ``key`` (one text), a key seen before returns the first send's row
        and writes nothing (:mod:`fieldchat.device.idempotency`)."""
        topic = self.topics.msg(cid)
        out = []
        if key is not None:
            idempotency.check_key(key)
            if len(texts) != 1:
                raise ConfigError("an idempotency key names one text")
        with (
            self._lock,
            self.state.transaction(durable=False, sync_outbox=self.power_safe) as tx,
        ):
            if key is not None:
                first = idempotency.lookup(tx, key, cid, texts[0], self.clock())
                if first is not None:
                    return [SentMessage(*first, replayed=True)], False
            for text in texts:
                now = self.clock()
                envelope = self.engine.seal(cid, TextMessage(sent_at=int(now), text=text))
                epoch, index, chain, step = read_header(envelope).dedupe_key
                seq = tx.add_outbox(topic, envelope, cid=cid, what=OutboxKind.MSG)
                row = tx.add_sent(cid, epoch, index, chain, step, text, topic, envelope, seq)
                out.append(SentMessage(row, cid, epoch, chain, step))
            if key is not None:
                sent = (row, cid, epoch, chain, step)
                idempotency.remember(tx, key, cid, texts[0], sent, self.clock())
            reserved = self.state.reserving
        return out, self.power_safe or reserved


def conversation_infos(engine: Engine) -> list[ConversationInfo]:
    """Every conversation the engine knows, with its roster (epoch -1: invited, the
    roster not received yet)."""
    out = []
    for cid in engine.conversations():
        try:
            roster = engine.roster(cid)
        except UnknownConversation:
            out.append(ConversationInfo(cid, -1, (), (), member=False, policy=None))
            continue
        admins = tuple(m.pid for m in roster.members if m.admin)
        out.append(
            ConversationInfo(
                cid,
                roster.epoch,
                roster.pids,
                admins,
                member=engine.is_member(cid),
                policy=roster.policy,
            )
        )
    return out


def fingerprint_of(engine: Engine, pid: str | None) -> str:
    """Our fingerprint (``pid`` None or ours), or a known participant's.

    Raises:
        UnknownParticipant: no bundle known for ``pid``.
    """
    if pid is None or pid == engine.pid:
        return engine.identity.fingerprint()
    bundle = engine.bundle_of(pid)
    if bundle is None:
        raise UnknownParticipant(f"no bundle known for {pid}: it has not connected yet")
    return bundle.fingerprint()


def undelivered_count(engine: Engine, state: DeviceState, cid: str) -> int:
    """Own messages of ``cid``'s current epoch some current member has not receipted."""
    roster = engine.roster(cid)
    missing: set[bytes] = set()
    for pid in roster.pids:
        if pid != engine.pid:
            missing |= {p for _, p in state.unreceipted(cid, roster.epoch, pid, 100_000)}
    return len(missing)


def same_fingerprint(a: str, b: str) -> bool:
    """Whether two fingerprints have the same digits (spacing as read aloud aside)."""
    return _digits(a) == _digits(b)


def _digits(fingerprint: str) -> str:
    return "".join(ch for ch in fingerprint if ch.isdigit())
