"""The roster republisher on its own (no broker): the newest epoch per conversation,
retries at the back of the queue, a bounded backlog; every refusal counted."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._publisher import REPUBLISH_ATTEMPTS, BrokerPublisher, RosterRepublisher
from fieldchat.gateway._quota import RefusalLog
from fieldchat.schemas import Topics
from fieldchat.schemas.errors import ConnectFailed, TransportError

CID_A = "a" * 25 + "a"
CID_B = "b" * 25 + "a"


class _Broker(BrokerPublisher):
    """Records publications; fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.sent: list[tuple[str, bytes, bool]] = []
        self.connected.set()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.failures:
            self.failures -= 1
            raise TransportError("broker gone")
        self.sent.append((topic, payload, retain))


def _republisher(broker: BrokerPublisher) -> tuple[RosterRepublisher, GatewayMetrics, Counter[str]]:
    metrics, counters = GatewayMetrics(), Counter[str]()
    return (
        RosterRepublisher(broker, Topics("x"), RefusalLog(metrics), counters, metrics),
        metrics,
        counters,
    )


async def _settle(republisher: RosterRepublisher) -> None:
    task = republisher._task  # wait for the publishing task
    if task is not None:
        await asyncio.wait_for(task, 5)


async def test_the_newest_epoch_of_a_conversation_goes_out_retained() -> None:
    broker = _Broker()
    broker.connected.clear()  # queued while not connected
    republisher, _, counters = _republisher(broker)
    republisher.queue(CID_A, 1, b"r1")
    republisher.queue(CID_A, 3, b"r3")
    republisher.queue(CID_A, 2, b"r2")  # older than what waits: dropped
    republisher.queue(CID_B, 0, b"b0")
    assert broker.sent == []
    broker.connected.set()
    republisher.kick()
    await _settle(republisher)
    topics = Topics("x")
    assert broker.sent == [(topics.roster(CID_A), b"r3", True), (topics.roster(CID_B), b"b0", True)]
    assert counters["republished"] == 2


async def test_a_failed_roster_is_tried_again_then_dropped_and_counted() -> None:
    broker = _Broker(failures=REPUBLISH_ATTEMPTS)
    republisher, metrics, _ = _republisher(broker)
    republisher.queue(CID_A, 0, b"r0")
    await _settle(republisher)
    for _ in range(REPUBLISH_ATTEMPTS - 1):
        assert metrics.rejected_count("mqtt", "republish_failed") == 0
        republisher.kick()  # the next connection tries again
        await _settle(republisher)
    assert broker.sent == []
    assert metrics.rejected_count("mqtt", "republish_failed") == 1
    republisher.kick()  # nothing left
    assert republisher._task is None or republisher._task.done()


async def test_publishing_without_a_connection_says_so() -> None:
    with pytest.raises(ConnectFailed):
        await BrokerPublisher().publish("x/c/a/msg", b"")
