"""Prometheus metrics of one gateway, in a registry of its own (no module globals)."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics", "RejectSource"]


class RejectSource(StrEnum):
    """Where a refused thing came from: the ``source`` label of
    ``fieldchat_gateway_rejected_total``."""

    MQTT = "mqtt"  # the archiver's subscriptions
    HTTP = "http"  # the API (uploads, claims, signed requests, the body limit)
    WS = "ws"  # a browser's WebSocket


_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class GatewayMetrics:
    """The gateway's counters, gauges and histograms (``/metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.archived = Counter(
            "fieldchat_gateway_envelopes_archived",
            "Envelopes newly written to the archive.",
            registry=r,
        )
        self.duplicates = Counter(
            "fieldchat_gateway_envelopes_duplicate",
            "Envelopes already archived (broker redelivery or another gateway).",
            registry=r,
        )
        self.rejected = Counter(
            "fieldchat_gateway_rejected",
            "Input refused, by source and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.pending = Gauge(
            "fieldchat_gateway_envelopes_pending",
            "Envelopes stored until their roster or the sender's bundle arrives.",
            registry=r,
        )
        self.rosters = Counter(
            "fieldchat_gateway_rosters_archived", "Rosters archived.", registry=r
        )
        self.grants = Counter(
            "fieldchat_gateway_grants_archived", "Inbox grants archived.", registry=r
        )
        self.rosters_held = Gauge(
            "fieldchat_gateway_rosters_held",
            "Rosters waiting for their previous epoch to be archived (never adopted before).",
            registry=r,
        )
        self.rosters_republished = Counter(
            "fieldchat_gateway_rosters_republished",
            "Rosters the gateway published, retained, on c/{cid}/roster (verified by it).",
            registry=r,
        )
        self.archive_lag = Histogram(
            "fieldchat_gateway_archive_lag_seconds",
            "Receipt-to-commit time of the oldest envelope of each commit.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fieldchat_gateway_archive_batch_size",
            "Messages per archive commit.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.ws_clients = Gauge(
            "fieldchat_gateway_ws_clients", "Connected WebSocket clients.", registry=r
        )
        self.ws_sent = Counter(
            "fieldchat_gateway_ws_envelopes_sent",
            "Envelopes sent to WebSocket clients.",
            registry=r,
        )
        self.ws_published = Counter(
            "fieldchat_gateway_ws_published",
            "Objects browsers published through the bridge.",
            ["kind"],
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "fieldchat_gateway_mqtt_connected",
            "1 while the archiver is connected to the broker.",
            registry=r,
        )
        self.mqtt_connects = Counter(
            "fieldchat_gateway_mqtt_connects",
            "Connections the archiver made to the broker (each one subscribes again).",
            registry=r,
        )
        self.canary_failures = Counter(
            "fieldchat_gateway_canary_failures",
            "Routing canaries that did not come back through the shared subscription in "
            "time (the archiver then subscribed again).",
            registry=r,
        )
        self.canary_seconds = Histogram(
            "fieldchat_gateway_canary_seconds",
            "Round trip of the routing canaries that came back.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.http_latency = Histogram(
            "fieldchat_gateway_http_request_seconds",
            "HTTP request latency.",
            ["method", "route", "status"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.logins = Counter(
            "fieldchat_gateway_logins", "Login attempts by outcome.", ["outcome"], registry=r
        )

    def reject(self, source: RejectSource, reason: str) -> None:
        self.rejected.labels(source=source, reason=reason).inc()

    def rejected_count(self, source: str, reason: str) -> float:
        """The current value of one rejection counter (tests, health output)."""
        value = self.registry.get_sample_value(
            "fieldchat_gateway_rejected_total", {"source": source, "reason": reason}
        )
        return value or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
