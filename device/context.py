"""What the parts of one :class:`~fieldchat.device.client.Device` share.

A device is a few parts with one job each, all on its worker thread unless they say
otherwise: :class:`~fieldchat.device.inbound.Inbound` opens and orders what arrives,
:class:`~fieldchat.device.rosters.RosterHandler` applies rosters, grants and bundles,
:class:`~fieldchat.device.outbound.Outbound` publishes the outbox and what the device
owes (receipts, gap requests, resends), :class:`~fieldchat.device.rounds.HistoryRounds`
talks to the history source on a thread of its own. They share the state file, the
engine and the options through one :class:`Shared`; a part's side effects outside the
state file (events, subscriptions, PUBACKs) collect in a :class:`Batch` applied by the
worker once the transaction committed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fieldchat.device.config import LinkOptions
from fieldchat.device.engine import Engine, Publication
from fieldchat.device.events import Event
from fieldchat.device.link import LinkConnection
from fieldchat.device.outbox import kind_of
from fieldchat.device.reconcile import Reconciling
from fieldchat.device.rows import OutboxKind
from fieldchat.device.state import DeviceState, StateTransaction
from fieldchat.device.tail import HistorySource
from fieldchat.schemas import Topics
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.errors import FieldchatError, KeyStoreError
from fieldchat.schemas.topics import Topic, TopicKind

__all__ = ["MAX_TOPICS_PARSED", "Batch", "Part", "Shared"]

MAX_TOPICS_PARSED = 1_024  # parsed topic names kept (a device sees few distinct ones)


class Shared:
    """The state file, engine, topics, options and counters of one device.

    ``options`` and ``history`` may be replaced until the device starts (tests and the
    command line set them after construction); every part reads them from here.
    """

    def __init__(
        self,
        state: DeviceState,
        engine: Engine,
        topics: Topics,
        options: LinkOptions,
        history: HistorySource | None,
        clock: Callable[[], float],
    ) -> None:
        self.state = state
        self.engine = engine
        self.topics = topics
        self.options = options
        self.history = history
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._parsed: dict[str, Topic] = {}

    def parse(self, topic: str) -> Topic | None:
        """The parsed topic name (cached: the same few names carry every message)."""
        parsed = self._parsed.get(topic)
        if parsed is None:
            try:
                parsed = self.topics.parse(topic)
            except FieldchatError:
                return None
            if len(self._parsed) >= MAX_TOPICS_PARSED:
                self._parsed.clear()
            self._parsed[topic] = parsed
        return parsed


class Part:
    """A part of a device: reads what it shares through :class:`Shared`."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self.state = shared.state
        self.engine = shared.engine
        self.topics = shared.topics
        self.counters = shared.counters
        self._clock = shared.clock

    @property
    def options(self) -> LinkOptions:
        return self._shared.options

    @property
    def history(self) -> HistorySource | None:
        return self._shared.history

    @property
    def pid(self) -> str:
        return self.engine.pid

    @property
    def _archive(self) -> Reconciling | None:
        """The history source when it reconciles (a gateway): then own envelopes are
        kept until archived. ``history`` may be set after construction."""
        history = self._shared.history
        return history if isinstance(history, Reconciling) else None

    def _parse(self, topic: str) -> Topic | None:
        return self._shared.parse(topic)

    def queue_publications(
        self, tx: StateTransaction, pubs: list[Publication], cid: str | None
    ) -> None:
        """Into the outbox: what the engine produced (rosters, grants, controls).

        An own envelope among them (a JOINED or ENDS control, §6.5/§6.6) is queued as
        :meth:`queue_own` queues one: under its conversation, and kept for gap
        requests and the archive like any own control (JOINED is step 0 of a new
        member's chain: unanswerable, a lost one held every receiver a window)."""
        for pub in pubs:
            topic = self._parse(pub.topic)
            what = kind_of(topic, pub.payload)
            if topic is not None and topic.kind is TopicKind.MSG and topic.cid is not None:
                self.queue_own(tx, topic.cid, pub.payload, what)
                continue
            tx.add_outbox(pub.topic, pub.payload, retain=pub.retain, cid=cid, what=what)

    def queue_own(self, tx: StateTransaction, cid: str, envelope: bytes, what: OutboxKind) -> None:
        """An own receipt or control: into the outbox, and kept a while for gap
        requests (texts are kept in ``sent``)."""
        topic = self.topics.msg(cid)
        seq = tx.add_outbox(topic, envelope, cid=cid, what=what)
        tx.add_kept(cid, read_header(envelope).dedupe_key, topic, envelope, seq)

    def _rejected(self, exc: FieldchatError) -> None:
        """Count a refusal by its reason (``rejected_<reason>``)."""
        self.counters[f"rejected_{exc.reason}"] += 1

    @contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        """A refusal inside (junk, a forgery, a rule) is counted, not raised: one bad
        envelope must not stop the batch. A state file failure still is raised."""
        try:
            yield
        except KeyStoreError:
            raise
        except FieldchatError as exc:
            self._rejected(exc)


@dataclass(slots=True)
class Batch:
    """Side effects of one worker transaction, applied after it commits."""

    acks: list[tuple[LinkConnection, int]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    subscribe: set[str] = field(default_factory=set)
    unsubscribe: set[str] = field(default_factory=set)
    retry_held: bool = False
    joined: bool = False  # a conversation joined: its archive comes in a tail round
