"""What the gateway publishes: browsers' publications and verified rosters.

:class:`BrokerPublisher` holds the archiver's current MQTT connection and publishes
through it (a browser's envelope, roster, grant, bundle or status; its ack follows
the broker's PUBACK). :class:`RosterRepublisher` keeps the rosters this gateway
verified and must put, retained, on ``c/{cid}/roster`` (on Mosquitto and NATS the
gateway is the verifier that writes it), and publishes them from a task of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._mqtt import MqttClient
from fieldchat.gateway._quota import RefusalLog
from fieldchat.schemas import Topics
from fieldchat.schemas.errors import ConnectFailed, TransportError

__all__ = ["BrokerPublisher", "RosterRepublisher"]

log = logging.getLogger("fieldchat.gateway.archiver")

OUTGOING_MAX = 10_000  # conversations whose roster waits to be republished
REPUBLISH_ATTEMPTS = 5


class BrokerPublisher:
    """Publishes at QoS 1 through the archiver's connection, while there is one."""

    def __init__(self) -> None:
        self.client: MqttClient | None = None
        self.connected = asyncio.Event()

    def attach(self, client: MqttClient) -> None:
        """The archiver is connected and subscribed through ``client``."""
        self.client = client
        self.connected.set()

    def detach(self) -> None:
        self.client = None
        self.connected.clear()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1; returns after the broker's PUBACK.

        Raises:
            ConnectFailed: not connected to the broker right now.
        """
        client = self.client
        if client is None or not self.connected.is_set():
            raise ConnectFailed("the gateway is not connected to the broker")
        await client.publish(topic, payload, retain=retain, timeout=10)


@dataclass(slots=True)
class _Outgoing:
    """A roster waiting to go out on ``c/{cid}/roster``."""

    epoch: int
    data: bytes
    attempts: int = 0


class RosterRepublisher:
    """Rosters to publish, retained, on ``c/{cid}/roster``: the newest epoch per cid.

    Published by a task of its own, so the archive loop never waits for a PUBACK (the
    client stops reading the socket while its inbox is full). One that fails goes to
    the back of the queue and is tried again at the next connection or republication,
    at most ``REPUBLISH_ATTEMPTS`` times (then dropped, counted).
    """

    def __init__(
        self,
        publisher: BrokerPublisher,
        topics: Topics,
        refusals: RefusalLog,
        counters: Counter[str],
        metrics: GatewayMetrics,
    ) -> None:
        self._publisher = publisher
        self._topics = topics
        self._refusals = refusals
        self._counters = counters
        self._metrics = metrics
        self._outgoing: dict[str, _Outgoing] = {}  # cid -> the roster to republish
        self._task: asyncio.Task[None] | None = None

    def queue(self, cid: str, epoch: int, data: bytes) -> None:
        """Publish this roster of ``cid`` unless a newer epoch of it is queued."""
        queued = self._outgoing.get(cid)
        if queued is not None and queued.epoch > epoch:
            return
        if queued is None and len(self._outgoing) >= OUTGOING_MAX:
            self._refusals.refuse("republish_backlog", f"roster of {cid} epoch {epoch}")
            return
        self._outgoing[cid] = _Outgoing(epoch, data)
        self.kick()

    def kick(self) -> None:
        """Start publishing what waits, when connected and not at it already."""
        if not self._outgoing or not self._publisher.connected.is_set():
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publish_all())

    async def stop(self) -> None:
        """Stop publishing (the connection ends); what is left waits for the next."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _publish_all(self) -> None:
        while self._outgoing:
            cid, item = next(iter(self._outgoing.items()))
            try:
                await self._publisher.publish(self._topics.roster(cid), item.data, retain=True)
            except TransportError as exc:
                item.attempts += 1
                if self._outgoing.get(cid) is item:
                    del self._outgoing[cid]
                    if item.attempts < REPUBLISH_ATTEMPTS:
                        self._outgoing[cid] = item  # to the back: others are not held up
                    else:
                        self._refusals.refuse("republish_failed", f"roster of {cid}: {exc}")
                log.info("republishing the roster of %s failed (%s); later", cid, exc)
                return
            if self._outgoing.get(cid) is item:
                del self._outgoing[cid]
            self._counters["republished"] += 1
            self._metrics.rosters_republished.inc()
