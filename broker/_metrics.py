"""Prometheus metrics of one broker instance (its own registry, so several brokers
can run in one process, as they do in tests)."""

from __future__ import annotations

import asyncio
import enum
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["BrokerMetrics", "Drop", "serve_metrics"]

log = logging.getLogger(__name__)


class Drop(enum.StrEnum):
    """Why a message was not delivered; the label of ``fieldchat_broker_queue_drops``."""

    OVERFLOW = "overflow"  # the session's queue was full: its oldest message went
    SLOW_CONSUMER = "slow_consumer"  # QoS 0 to a socket far behind
    EXPIRED = "expired"  # its Message Expiry Interval passed (MQTT-3.3.2-5)
    TOO_LARGE_FOR_CLIENT = "too_large_for_client"  # above its Maximum Packet Size


class BrokerMetrics:
    """The broker's counters and gauges (``fieldchat_broker_*``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected = Gauge(
            "fieldchat_broker_connected_clients", "Authenticated clients connected now", registry=r
        )
        self.connections = Counter(
            "fieldchat_broker_connections", "Network connections accepted", registry=r
        )
        self.messages_in = Counter(
            "fieldchat_broker_messages_in", "PUBLISH packets accepted from clients", registry=r
        )
        self.messages_out = Counter(
            "fieldchat_broker_messages_out", "PUBLISH packets sent to clients", registry=r
        )
        self.denials = Counter(
            "fieldchat_broker_denials",
            "Refused logins, publishes and subscriptions, by reason",
            ["reason"],
            registry=r,
        )
        self.queue_drops = Counter(
            "fieldchat_broker_queue_drops",
            "Messages dropped because a session queue or a socket buffer was full",
            ["reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "fieldchat_broker_dropped_connections",
            "Connections the broker closed, by reason",
            ["reason"],
            registry=r,
        )
        self.throttled = Counter(
            "fieldchat_broker_throttled",
            "Pauses in reading a participant that published faster than its quota, by limit",
            ["limit"],
            registry=r,
        )
        self.queued = Gauge(
            "fieldchat_broker_queued_messages",
            "QoS 1 messages waiting in sessions (queued or in flight)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (tests and ``--json`` output)."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else found


async def serve_metrics(metrics: BrokerMetrics, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.0 endpoint: ``GET /metrics`` in the Prometheus text format."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if request.startswith(b"GET ") and path in (b"/metrics", b"/"):
                body = metrics.render()
                head = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
            else:
                body = b"not found\n"
                head = "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            log.debug("metrics request failed", exc_info=True)
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
