"""The broker's ``route`` span of a conversation envelope (docs/tracing.md)."""

from __future__ import annotations

import asyncio

from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.frame import split
from fieldchat.schemas.topics import Topic, TopicKind
from fieldchat.schemas.tracing import Tracer

__all__ = ["trace_route"]


def trace_route(
    tracer: Tracer,
    packet: mqtt.Publish,
    parsed: Topic | None,
    start: int,
    pending: asyncio.Future[None] | None,
    denied: str | None,
    fanout: int,
) -> None:
    """The ``route`` span of a conversation envelope (docs/tracing.md).

    It ends when the publisher's acknowledgement may go: after routing, or after
    the commit of the queued copies it waits for (``fieldchat.broker.persisted``).
    """
    if parsed is None or parsed.kind is not TopicKind.MSG:
        return
    cid = parsed.cid
    assert cid is not None
    attributes: dict[str, int | str | bool] = {
        "messaging.operation.type": "receive",
        "fieldchat.broker.qos": packet.qos,
        "fieldchat.broker.fanout": fanout,
        "fieldchat.broker.persisted": pending is not None,
    }

    try:  # one span per envelope, also of a frame (PROTOCOL.md §3.4)
        envelopes = split(packet.payload)
    except FieldchatError:
        envelopes = [packet.payload]  # the tracer ignores what is not an envelope

    def emit(_: object = None) -> None:
        for envelope in envelopes:
            tracer.span(
                "route",
                cid,
                envelope,
                kind="consumer",
                start_ns=start,
                error=denied,
                attributes=attributes,
            )

    if pending is None or pending.done():
        emit()
    else:
        pending.add_done_callback(emit)
