"""Optional OpenTelemetry traces of an envelope's path, with nothing added to the wire.

Device publish → broker route → gateway archive → WebSocket delivery: each component
derives the same trace from the envelope's routing fields, which the broker already
sees (``cid`` from the topic; epoch, sender index, chain and step from the cleartext
header, PROTOCOL.md §3.2)::

    h             = BLAKE2b-192(key = trace key or none, person = "fieldchat-trace1",
                                cid_bytes || epoch || sender || chain || step)  # u32 BE each
    trace_id      = h[0:16]
    root_span_id  = h[16:24]

The publisher's ``publish`` span is the root (span id ``root_span_id``); every other
span is a child of that root with a random span id. So no trace context travels:
MQTT 3.1.1 has no user properties, and on a slow link every byte counts. Children
hang off the root, not off each other: a hop that does not trace (Mosquitto, a
device that does not export) leaves one gap, not a broken chain.

Spans carry routing fields and sizes only — never plaintext, keys, credentials or
pids (see ``docs/tracing.md`` for what a tracing backend learns). With a trace key
(``FIELDCHAT_TRACE_KEY``, the same on every component) trace ids cannot be linked
to conversations without the key and the cid is replaced by a keyed tag.

The OpenTelemetry SDK is the ``tracing`` extra and is imported only by
:func:`configure`; until then (and when tracing is off) :func:`tracer` returns
``None`` and a hook costs one ``is not None`` test. Like logging, tracing is set up
once per process by its entry point (the CLI), so the hooks stay one line each; the
environment is read only there (:meth:`TraceSettings.from_environ`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretBytes

from fieldchat.schemas.errors import ConfigError
from fieldchat.schemas.ids import decode_id

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "STOP_TIMEOUT_S",
    "Component",
    "SpanKindName",
    "TraceIds",
    "TraceSettings",
    "Tracer",
    "Tracing",
    "configure",
    "derive",
    "shutdown",
    "trace_ids",
    "tracer",
]

Component = Literal["device", "broker", "gateway"]
SpanKindName = Literal["producer", "consumer", "server", "client", "internal"]

TRACE_PERSON = b"fieldchat-trace1"  # BLAKE2b personalization: domain separation
TAG_PERSON = b"fieldchat-ctag-1"  # the keyed conversation tag's
_MAX_KEY_BYTES = 64  # BLAKE2b's key limit
STOP_TIMEOUT_S = 3.0  # the most a stop waits for the collector to take the last spans

log = logging.getLogger("fieldchat.tracing")
_FIELDS = struct.Struct(">4I")  # epoch, sender, chain, step


@dataclass(frozen=True, slots=True)
class TraceIds:
    """The trace of one envelope: its id and the span id of its root ``publish`` span.

    A slotted dataclass, not a pydantic model: one is made per traced hop.
    """

    trace_id: int
    root_span_id: int

    @property
    def trace_hex(self) -> str:
        """As backends show and search it (32 hex digits)."""
        return f"{self.trace_id:032x}"


def trace_ids(
    cid: str, epoch: int, sender: int, chain: int, step: int, *, key: bytes = b""
) -> TraceIds:
    """Derive the trace of envelope ``(cid, epoch, sender, chain, step)``.

    Operators use it to find one message's trace; every component uses it to agree
    on the trace without carrying context.

    Raises:
        InvalidId: ``cid`` is not a fieldchat id.
    """
    return derive(decode_id(cid), epoch, sender, chain, step, key)


def derive(
    cid_bytes: bytes, epoch: int, sender: int, chain: int, step: int, key: bytes
) -> TraceIds:
    """:func:`trace_ids` from the raw 16-byte cid (the hot path has it decoded).

    Raises:
        struct.error: a field outside [0, 2^32) (headers hold less than 2^28).
    """
    fields = _FIELDS.pack(epoch, sender, chain, step)  # headers hold each below 2^28
    h = hashlib.blake2b(cid_bytes + fields, digest_size=24, key=key, person=TRACE_PERSON).digest()
    # An all-zero id is invalid in OTel/W3C; 2^-64 odds, but never emit one.
    trace_id = int.from_bytes(h[:16], "big") or 1
    span_id = int.from_bytes(h[16:], "big") or 1
    return TraceIds(trace_id, span_id)


class TraceSettings(BaseModel):
    """What to export and how much. Built at the edge, usually :meth:`from_environ`.

    ``ratio``: the share of envelopes traced, decided from the trace id as
    OpenTelemetry's ``traceidratio`` sampler does, so every component keeps the
    same envelopes. ``key``: see the module docstring; empty means unkeyed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    exporter: Literal["otlp", "console"] = "otlp"
    ratio: float = Field(default=1.0, gt=0.0, le=1.0)
    key: SecretBytes = SecretBytes(b"")
    service_name: str | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, force: bool = False
    ) -> TraceSettings | None:
        """Tracing settings from the standard ``OTEL_*`` variables; ``None`` when off.

        On when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``), or
        an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
        ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), or ``force`` (``--trace``). Off when
        none of these, ``OTEL_TRACES_EXPORTER=none``, ``OTEL_SDK_DISABLED=true`` or an
        ``always_off`` sampler. The OTLP exporter reads its own variables (endpoint,
        headers, timeout) from the environment as the SDK documents.

        Raises:
            ConfigError: an exporter, protocol, sampler or key we cannot honour.
        """
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        named = [e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
        endpoint = any(
            environ.get(v)
            for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        if named == ["none"] or not (named or endpoint or force):
            return None
        exporter = named[0] if named else "otlp"
        if len(named) > 1 or exporter not in ("otlp", "console"):
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={','.join(named)}: fieldchat exports to one of otlp, console"
            )
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        if exporter == "otlp" and protocol not in (None, "", "http/protobuf"):
            raise ConfigError(
                f"OTLP protocol {protocol!r}: fieldchat exports OTLP over http/protobuf only"
            )
        ratio = _ratio(environ)
        if ratio is None:
            return None
        key = environ.get("FIELDCHAT_TRACE_KEY", "").encode()
        if len(key) > _MAX_KEY_BYTES:
            raise ConfigError(f"FIELDCHAT_TRACE_KEY is longer than {_MAX_KEY_BYTES} bytes")
        return cls(
            exporter="otlp" if exporter == "otlp" else "console",
            ratio=ratio,
            key=SecretBytes(key),
            service_name=environ.get("OTEL_SERVICE_NAME") or None,
        )


def _ratio(environ: Mapping[str, str]) -> float | None:
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower().removeprefix("parentbased_")
    # parentbased_* is the same here: a child's parent is derived, and so is its decision.
    if sampler in ("", "always_on"):
        return 1.0
    if sampler == "always_off":
        return None
    if sampler != "traceidratio":
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER={sampler}: use always_on, always_off or traceidratio"
        )
    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        raise ConfigError("OTEL_TRACES_SAMPLER_ARG must be a number in [0, 1]") from None
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError("OTEL_TRACES_SAMPLER_ARG must be a number in [0, 1]")
    return ratio or None


class Tracer(Protocol):
    """Records one component's spans of envelopes (made by :func:`tracer`).

    Never raises: an envelope whose header does not parse (the broker routes whatever
    a member publishes) is simply not traced. Thread-safe.
    """

    def publish(self, topic: str, envelope: bytes, *, start_ns: int | None = None) -> None:
        """The root ``publish`` span (a device, or the gateway for a browser).

        ``topic`` is the MQTT topic; anything but ``…/c/{cid}/msg`` is ignored, so the
        hook can sit where every publication leaves. A republished envelope (after a
        reconnect) becomes a child ``publish`` span marked ``fieldchat.resend``: a span
        id must not repeat within a trace.
        """

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
        """A child span of the envelope's root: ``route``, ``archive``, ``ws deliver``.

        ``start_ns``/``end_ns`` are :func:`time.time_ns` values (default: now);
        ``error`` marks the span failed with that reason (a denial). ``attributes``
        must be routing facts and counts, never content.
        """


class Tracing:
    """The span pipelines of one process: a tracer per component, made on first use.

    Each component is its own OpenTelemetry service (``fieldchat-broker``…, or
    ``OTEL_SERVICE_NAME``) exported through the SDK's ``BatchSpanProcessor``: a
    bounded queue (2,048 spans; the excess is dropped, the caller never blocks) and
    a background thread (``OTEL_BSP_*`` tune it).

    Raises:
        ConfigError: the ``tracing`` extra is not installed.
    """

    def __init__(self, settings: TraceSettings) -> None:
        try:
            from fieldchat.schemas import _otel  # noqa: PLC0415 - the extra is optional: import on demand
        except ImportError as exc:
            raise ConfigError(
                f"tracing is on but {exc.name} is missing: pip install 'fieldchat[tracing]'"
            ) from None
        self.settings = settings
        self._make = _otel.make_pipeline
        self._made: dict[Component, tuple[TracerProvider, Tracer]] = {}
        self._lock = threading.Lock()

    def tracer(self, component: Component) -> Tracer:
        with self._lock:
            made = self._made.get(component)
            if made is None:
                made = self._made[component] = self._make(self.settings, component)
            return made[1]

    def flush(self, timeout_s: float = 5.0) -> None:
        """Export what is queued now (tests; before a planned stop)."""
        for provider, _ in list(self._made.values()):
            provider.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Flush and stop every pipeline within ``timeout_s``; later spans are dropped.

        Bounded because the SDK's own shutdown waits up to 30 s per pipeline while the
        exporter retries an unreachable collector: a broker stopping under systemd or
        Kubernetes must not wait on its tracing backend.
        """
        with self._lock:
            made, self._made = list(self._made.values()), {}
        stops = [threading.Thread(target=p.shutdown, daemon=True) for p, _ in made]
        for stop in stops:
            stop.start()
        deadline = time.monotonic() + timeout_s
        for stop in stops:
            stop.join(max(0.0, deadline - time.monotonic()))
        if any(stop.is_alive() for stop in stops):
            log.warning("tracing: the collector did not take the last spans in %.0f s", timeout_s)


_process: Tracing | None = None  # set once by the entry point, like logging's root logger


def configure(settings: TraceSettings | None) -> None:
    """Turn tracing on for this process (``None``: leave it off). Entry points only.

    Call it before building the broker, gateway or device, which take their tracer
    when they are made. Queued spans leave at :func:`shutdown`, which also runs at
    exit (an entry point that serves calls it when it stops).

    Raises:
        ConfigError: the ``tracing`` extra is not installed.
    """
    global _process  # noqa: PLW0603 - process-wide, like logging.basicConfig
    if settings is None:
        return
    if _process is not None:
        _process.shutdown()
    else:
        atexit.register(shutdown)  # bounded, unlike the SDK's own exit hook
    _process = Tracing(settings)


def tracer(component: Component) -> Tracer | None:
    """This process's tracer for ``component``, or ``None`` when tracing is off."""
    return None if _process is None else _process.tracer(component)


def shutdown() -> None:
    """Flush and stop this process's tracing (a no-op when it is off)."""
    global _process  # noqa: PLW0603
    if _process is not None:
        _process.shutdown()
        _process = None
