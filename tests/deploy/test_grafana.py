"""deploy/grafana/fieldchat-dashboard.json queries only metrics that exist, by real labels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from fieldchat.broker._metrics import BrokerMetrics
from fieldchat.gateway._metrics import GatewayMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fieldchat-dashboard.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> dict[str, set[str]]:
    """Every series name the gateway and broker export, with its label names."""
    out: dict[str, set[str]] = {}
    for metrics in (GatewayMetrics(), BrokerMetrics()):
        for value in vars(metrics).values():
            if isinstance(value, MetricWrapperBase):
                kind = value._type  # the library's own type name: counter, gauge, histogram
                assert kind is not None
                labels = set(value._labelnames) | ({"le"} if kind == "histogram" else set())
                for suffix in SUFFIXES[kind]:
                    out[value._name + suffix] = labels
    return out


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_query_names_an_exported_metric_and_its_labels():
    series = exported()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = re.findall(r"\bfieldchat_[a-z_]+\b", expr)
        assert names, expr
        for name in names:
            assert name in series, f"{name} is not exported ({expr})"
            used.add(name)
            for group in re.findall(r"by \(([^)]*)\)", expr):
                labels = {label.strip() for label in group.split(",")}
                assert labels <= series[name], f"{expr}: {labels - series[name]} unknown"
    # The metrics are all on the dashboard.
    for wanted in (
        "fieldchat_gateway_envelopes_archived_total",
        "fieldchat_gateway_rejected_total",
        "fieldchat_gateway_ws_clients",
        "fieldchat_gateway_archive_lag_seconds_bucket",
        "fieldchat_gateway_http_request_seconds_bucket",
        "fieldchat_broker_connected_clients",
        "fieldchat_broker_denials_total",
        "fieldchat_broker_queue_drops_total",
    ):
        assert wanted in used, wanted


def test_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource"}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == "${datasource}"
            assert target["refId"]
