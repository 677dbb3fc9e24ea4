"""The OpenTelemetry side of :mod:`fieldchat.schemas.tracing`; imported only when tracing is on.

Everything here needs the ``tracing`` extra (``opentelemetry-sdk`` and the OTLP/HTTP
exporter), so nothing imports this module except :class:`schemas.tracing.Tracing`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Status, StatusCode

from fieldchat.schemas.envelope import EnvelopeKind, read_header
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.tracing import (
    TAG_PERSON,
    Component,
    SpanKindName,
    TraceIds,
    TraceSettings,
    derive,
)

__all__ = ["EnvelopeTracer", "make_pipeline"]

_ROOTS_REMEMBERED = 4096  # own roots already exported: a resend becomes a child span
_CIDS_REMEMBERED = 65_536  # decoded cids (base32 decoding costs more than the hash)
_KIND_NAMES = {k: k.name.lower() for k in EnvelopeKind}
_KINDS = {k.name.lower(): k for k in SpanKind}
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
_LOW64 = (1 << 64) - 1


class _PresetIds(IdGenerator):
    """The SDK's random ids, except that the next root span takes preset ones.

    The OpenTelemetry API cannot give a span a chosen id; the id generator is the
    SDK's extension point for that (AWS X-Ray's ids come through it too).
    ``preset`` and ``start_span`` run on the same thread with nothing in between,
    hence the thread-local.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._local = threading.local()

    def preset(self, trace_id: int, span_id: int) -> None:
        self._local.ids = (trace_id, span_id)

    def _ids(self) -> tuple[int, int]:
        ids: tuple[int, int] = getattr(self._local, "ids", (0, 0))
        return ids

    def generate_trace_id(self) -> int:
        return self._ids()[0] or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        return self._ids()[1] or self._random.generate_span_id()


class EnvelopeTracer:
    """Records one component's spans of envelopes (:class:`schemas.tracing.Tracer`).

    Thread-safe. Never raises into the caller's hot path: an envelope whose header
    does not parse (the broker routes whatever a member publishes) is not traced.
    """

    def __init__(self, otel: trace.Tracer, ids: _PresetIds, settings: TraceSettings) -> None:
        self._otel = otel
        self._ids = ids
        self._key = settings.key.get_secret_value()
        self._bound = round(settings.ratio * 2**64)  # as OpenTelemetry's TraceIdRatioBased
        self._roots: OrderedDict[int, None] = OrderedDict()
        self._cids: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._empty = context.Context()  # never the caller's ambient span

    def publish(self, topic: str, envelope: bytes, *, start_ns: int | None = None) -> None:
        parts = topic.rsplit("/", 3)
        if len(parts) != 4 or parts[1] != "c" or parts[3] != "msg":
            return
        fields = self._fields(parts[2], envelope)
        if fields is None:
            return
        ids, attributes = fields
        with self._lock:
            resend = ids.trace_id in self._roots
            self._roots[ids.trace_id] = None
            self._roots.move_to_end(ids.trace_id)
            if len(self._roots) > _ROOTS_REMEMBERED:
                self._roots.popitem(last=False)
        if resend:  # a span id must not repeat within a trace
            attributes["fieldchat.resend"] = True
            self._child(ids, "publish", "producer", attributes, start_ns, None, None)
            return
        self._ids.preset(ids.trace_id, ids.root_span_id)
        try:
            span = self._otel.start_span(
                "publish",
                context=self._empty,
                kind=SpanKind.PRODUCER,
                attributes=attributes,
                start_time=start_ns,
            )
        finally:
            self._ids.preset(0, 0)
        span.end()

    def span(
        self,
        name: str,
        cid: str,
        envelope: bytes,
        *,
        kind: SpanKindName = "internal",
        start_ns: int | None = None,
        end_ns: int | None = None,
        error: str | None = None,
        attributes: Mapping[str, int | str | bool] | None = None,
    ) -> None:
        fields = self._fields(cid, envelope)
        if fields is None:
            return
        ids, attrs = fields
        if attributes:
            attrs.update(attributes)
        self._child(ids, name, kind, attrs, start_ns, end_ns, error)

    def _fields(self, cid: str, envelope: bytes) -> tuple[TraceIds, dict[str, Any]] | None:
        try:
            header = read_header(envelope)
            cid_bytes = self._cids.get(cid)
            if cid_bytes is None:
                if len(self._cids) >= _CIDS_REMEMBERED:
                    self._cids.clear()
                cid_bytes = self._cids[cid] = decode_id(cid)
        except FieldchatError:
            return None
        ids = derive(cid_bytes, header.epoch, header.sender, header.chain, header.step, self._key)
        if (ids.trace_id & _LOW64) >= self._bound:
            return None
        attributes: dict[str, Any] = {
            "messaging.system": "mqtt",
            "messaging.message.body.size": len(envelope),
            "fieldchat.epoch": header.epoch,
            "fieldchat.sender": header.sender,
            "fieldchat.chain": header.chain,
            "fieldchat.step": header.step,
            "fieldchat.kind": _KIND_NAMES[header.kind],
            "fieldchat.signed": header.signed,
        }
        if self._key:
            tag = hashlib.blake2b(cid_bytes, digest_size=8, key=self._key, person=TAG_PERSON)
            attributes["fieldchat.conversation"] = tag.hexdigest()
        else:
            attributes["fieldchat.cid"] = cid
        return ids, attributes

    def _child(
        self,
        ids: TraceIds,
        name: str,
        kind: SpanKindName,
        attributes: dict[str, Any],
        start_ns: int | None,
        end_ns: int | None,
        error: str | None,
    ) -> None:
        root = trace.SpanContext(
            ids.trace_id, ids.root_span_id, is_remote=True, trace_flags=_SAMPLED
        )
        parent = trace.set_span_in_context(trace.NonRecordingSpan(root), self._empty)
        span = self._otel.start_span(
            name, context=parent, kind=_KINDS[kind], attributes=attributes, start_time=start_ns
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_ns if end_ns is not None else time.time_ns())


def make_pipeline(
    settings: TraceSettings, component: Component
) -> tuple[TracerProvider, EnvelopeTracer]:
    """One component's provider (its own service name) and tracer."""
    ids = _PresetIds()
    provider = TracerProvider(
        sampler=ALWAYS_ON,  # sampled before a span is made, from the trace id (settings.ratio)
        resource=Resource.create(
            {"service.name": settings.service_name or f"fieldchat-{component}"}
        ),
        id_generator=ids,
        shutdown_on_exit=False,  # its exit hook may wait 30 s; schemas.tracing has a bounded one
    )
    exporter: SpanExporter = (
        OTLPSpanExporter() if settings.exporter == "otlp" else ConsoleSpanExporter()
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, EnvelopeTracer(provider.get_tracer(f"fieldchat.{component}"), ids, settings)
