"""Routing canaries on the archiver's connection (docs/gateway.md, "Routing").

A canary goes out through the shared subscription at each connection and every
``canary_interval_s``; whichever gateway of the share group receives it notes its nonce
in the database (or, its own, wakes the waiting sender at once). One not back within
``canary_timeout_s`` is counted and logged, the envelopes' filter is subscribed again,
and after ``RECONNECT_AFTER`` failures in a row the archiver reconnects. The codec (a
nonce and its HMAC) is ``gateway._routing.Canary``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence

from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._mqtt import Delivered, MqttClient
from fieldchat.gateway._routing import CANARY_CID, CANARY_SECRET, Canary
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._store import HistoryStore
from fieldchat.schemas import Topics
from fieldchat.schemas.errors import FieldchatError, TransportError

__all__ = ["CanaryWatch"]

log = logging.getLogger("fieldchat.gateway.archiver")

POLL_S = 0.1  # how often the sender looks in the database for its canary
BACKLOG_FACTOR = 6  # a replica draining full batches waits up to 6 timeouts
RECONNECT_AFTER = 3  # failures in a row (each followed by a resubscription)


class CanaryWatch:
    """Sends canaries and receives everyone's.

    Args:
        settings: ``canary_interval_s``, ``canary_timeout_s``.
        store: the shared key (``gateway_secrets``) and the noted nonces.
        metrics: failures and round trips.
        topics: where canaries go (``c/{CANARY_CID}/msg``).
        draining: true while the archiver drains full batches (a canary waits in the
            queue then, so it gets longer).
        refuse: counts a canary that does not verify.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        store: HistoryStore,
        metrics: GatewayMetrics,
        topics: Topics,
        *,
        draining: Callable[[], bool],
        refuse: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self._store = store
        self._metrics = metrics
        self.topic = topics.msg(CANARY_CID)
        self._draining = draining
        self._refuse = refuse
        self._canary: Canary | None = None  # made at the first connection (shared key)
        self._waiting: dict[bytes, asyncio.Event] = {}  # nonces this replica sent
        self._failures = 0  # in a row

    async def _codec(self) -> Canary:
        if self._canary is None:
            key = await self._store.secret(CANARY_SECRET, os.urandom(32))
            self._canary = Canary(key)
        return self._canary

    async def watch(self, client: MqttClient, shared: Sequence[tuple[str, int]]) -> None:
        """Send a canary now and every ``canary_interval_s``; when one does not come
        back in time, count it, log the first of a run, subscribe to ``shared`` (the
        envelopes' filter) again and send the next at once; after ``RECONNECT_AFTER``
        in a row, close ``client`` (the archive loop reconnects)."""
        interval = self.settings.canary_interval_s
        if interval <= 0:
            return
        while True:
            try:
                seen = await self._send(client)
            except FieldchatError as exc:  # the database: try again at the next round
                log.warning("routing canary not checked: %s", exc)
                seen = None
            if seen is False:
                self._failures += 1
                self._metrics.canary_failures.inc()
                if self._failures == 1:
                    log.warning(
                        "routing canary not back within %.1f s: the broker may have dropped "
                        "the subscription to %s; subscribing again",
                        self.settings.canary_timeout_s,
                        shared[0][0],
                    )
                if self._failures % RECONNECT_AFTER == 0:
                    log.warning("routing canary still lost: reconnecting")
                    await client.close()  # the archive loop sees it and reconnects
                    return
                try:
                    await client.subscribe(list(shared))
                except TransportError as exc:
                    log.warning("subscribing again failed (%s): reconnecting", exc)
                    await client.close()
                    return
                continue
            if seen and self._failures:
                log.info("routing canary back after %d failures", self._failures)
                self._failures = 0
            await asyncio.sleep(interval)

    async def _send(self, client: MqttClient) -> bool | None:
        """Publish a canary and wait for some gateway to receive it: True, False (not in
        time), None (it could not be published: the session is ending)."""
        canary = await self._codec()
        timeout = self.settings.canary_timeout_s
        nonce, payload = canary.make()
        arrived = self._waiting[nonce] = asyncio.Event()
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline, latest = start + timeout, start + timeout * BACKLOG_FACTOR
        try:
            try:
                await client.publish(self.topic, payload, timeout=timeout)
            except TransportError:
                return None
            while not (arrived.is_set() or await self._store.canary_seen(nonce)):
                now = loop.time()
                if now >= deadline:
                    if not (self._draining() and now < latest):
                        return False
                    deadline = now + timeout  # draining a queue: the canary is in it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), min(POLL_S, deadline - now))
            self._metrics.canary_seconds.observe(loop.time() - start)
            return True
        finally:
            del self._waiting[nonce]

    async def take(self, batch: Sequence[Delivered]) -> list[Delivered]:
        """Handle the canaries of a batch (never archived); the rest of it."""
        canary = await self._codec()
        rest: list[Delivered] = []
        for m in batch:
            if m.topic != self.topic:
                rest.append(m)
                continue
            nonce = canary.nonce_of(m.payload)
            if nonce is None:
                self._refuse("canary")
            elif nonce in self._waiting:
                self._waiting[nonce].set()  # our own: no database needed
            else:
                await self._store.record_canary(nonce, time.time())  # another replica's
        return rest
