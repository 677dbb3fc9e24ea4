"""An in-memory stand-in for the broker's routing, for engine tests (no network).

It only routes what the engines publish: rosters proposed on ``c/{cid}/propose`` to
everyone (as the verifier retaining them on ``c/{cid}/roster`` would; the engines
check the chain themselves), inbox payloads (deliveries, grants, rosters) to their
addressee, bundles to everyone, and the envelopes an engine publishes itself (ENDS
and UPDATE controls) to everyone, who open them.
The real brokers are exercised by the client tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from fieldchat.device.engine import Engine, Opened, Publication
from fieldchat.device.identity import Identity
from fieldchat.schemas import FieldchatError, TextMessage, TopicKind, Topics


def text_of(opened: Opened | None) -> str:
    """The text of an opened envelope, asserting it was a text message (for mypy too)."""
    assert opened is not None
    assert isinstance(opened.message, TextMessage)
    return opened.message.text


class Mesh:
    def __init__(self, *names: str, post_quantum: Iterable[str] = ()) -> None:
        pq = set(post_quantum) if post_quantum else set(names)
        self.engines = {name: Engine(Identity.generate(post_quantum=name in pq)) for name in names}
        self.topics = Topics()
        for engine in self.engines.values():
            for other in self.engines.values():
                engine.learn_bundle(other.identity.bundle.to_bytes())
        self.errors: list[tuple[str, FieldchatError]] = []

    def __getitem__(self, name: str) -> Engine:
        return self.engines[name]

    def join(self, name: str, engine: Engine) -> Engine:
        """Add ``engine`` (its own clock or store) as ``name``; bundles known both ways."""
        for other in self.engines.values():
            other.learn_bundle(engine.identity.bundle.to_bytes())
            engine.learn_bundle(other.identity.bundle.to_bytes())
        self.engines[name] = engine
        return engine

    def deliver(self, publications: Iterable[Publication]) -> None:
        queue = list(publications)
        while queue:
            pub = queue.pop(0)
            topic = self.topics.parse(pub.topic)
            for name, engine in list(self.engines.items()):
                try:
                    if topic.kind in (TopicKind.ROSTER, TopicKind.PROPOSE):
                        queue += engine.handle_roster(pub.payload)
                    elif topic.kind is TopicKind.INBOX and topic.pid == engine.pid:
                        result = engine.handle_inbox(pub.payload)
                        queue += result if isinstance(result, list) else result.publications
                    elif topic.kind is TopicKind.BUNDLE and topic.pid != engine.pid:
                        engine.learn_bundle(pub.payload)
                        queue += engine.pay_owed_grants()
                    elif topic.kind is TopicKind.MSG and topic.cid and engine.is_member(topic.cid):
                        engine.open(topic.cid, pub.payload)  # to those subscribed
                except FieldchatError as exc:
                    self.errors.append((name, exc))

    def answer_updates(self) -> None:
        """Every admin answers the UPDATE and REKEY requests it can (§6.7)."""
        for engine in list(self.engines.values()):
            self.deliver(engine.answer_updates())

    def create(self, creator: str, *members: str, **policy: object) -> str:
        from fieldchat.schemas import Policy

        cid, pubs = self[creator].create_conversation(
            [self[m].pid for m in members],
            policy=Policy(**policy),  # type: ignore[arg-type]
        )
        self.deliver(pubs)
        return cid
