"""The resources of one running gateway, opened in the app's lifespan and handed down."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fieldchat.gateway._accounts import Accounts
from fieldchat.gateway._archiver import Archiver
from fieldchat.gateway._auth import Authenticator
from fieldchat.gateway._hub import Hub
from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._store import GatewayStore
from fieldchat.schemas import Topics
from fieldchat.schemas.errors import TransportError

__all__ = ["Gateway"]

log = logging.getLogger("fieldchat.gateway")


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: GatewaySettings
    store: GatewayStore
    accounts: Accounts
    metrics: GatewayMetrics
    archiver: Archiver
    hub: Hub
    topics: Topics
    auth: Authenticator

    async def publish_best_effort(self, topic: str, payload: bytes, *, retain: bool) -> bool:
        """Publish when the broker is reachable; log and return False otherwise."""
        try:
            await self.archiver.publish(topic, payload, retain=retain)
        except TransportError as exc:
            log.warning("could not publish to %s: %s", topic, exc)
            return False
        return True
