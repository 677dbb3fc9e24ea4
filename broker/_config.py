"""Broker configuration: frozen option groups, built at the edge (CLI, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fieldchat.schemas.errors import InvalidId
from fieldchat.schemas.topics import DEFAULT_PREFIX, Topics

__all__ = ["BrokerConfig", "Limits", "TlsConfig"]

Port = Annotated[int, Field(ge=0, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Frozen):
    """Named limits; each one, when hit, is logged and counted (never silent).

    ``max_queued_messages``: per persistent session. Past it the *oldest* queued
    message is dropped, logged and counted in ``fieldchat_broker_queue_drops_total``:
    a device that was away that long backfills from the gateway's history, and
    dropping from the old end leaves one contiguous gap it can fill by asking for
    "everything before the first message I got" (dropping the newest would leave a
    hole in the middle). 100,000 messages of 256 B is about 45 MB with Python's overhead,
    acceptable on a Pi; Mosquitto's default of 1,000 lost a third of a burst.

    Before authentication (issue 13: 1,030 idle sockets from one address filled the
    1,024 connections and reset a real device's login): a socket must send CONNECT
    within ``connect_timeout_s`` of being accepted (5 s: a client sends it at once,
    half a round trip later, ~0.3 s on a geostationary satellite link; raise it for
    links with long stalls); at most
    ``max_pending_per_address`` connections of one IP address (IPv6: one /64) may be
    waiting for their CONNECT (0: no such cap, e.g. behind a TCP proxy that hides
    addresses), and at most ``max_pending`` in all (default: half of
    ``max_connections``); past that the *oldest* waiting one is closed, so a flood
    from many addresses cannot keep the others from logging in.

    Per participant (gateways publish for every browser and are exempt from the
    rate): ``rate_*`` are token buckets on accepted PUBLISH packets and their bytes.
    Over them the broker stops reading the client's socket until tokens refill (TCP
    pushback: nothing is dropped) and counts ``fieldchat_broker_throttled_total``.
    The defaults never slow a device (the device benchmark's fastest burst, 15,000
    envelopes/s in frames of 64, is about 240 PUBLISH/s and 1.5 MB/s for a few
    seconds; ``bench/broker.py``'s 20,000 back-to-back 256-byte messages stay inside
    the burst) but hold a flood to about 1,000 PUBLISH/s and 1 MiB/s, a twentieth of
    what the broker routes. 0 turns a bucket off.

    ``max_founded`` conversations (accepted epoch-0 rosters signed by one
    participant) per ``founding_window_s``; ``max_bundle_bytes`` and
    ``max_status_bytes`` bound the participant's own retained topics (a bundle with
    ML-KEM is ~1.3 KiB, a status a few bytes). With retained publishes refused on
    inbox and msg topics, a participant's retained state is its bundle, its status
    and the rosters of the conversations it founded (≤ 7.6 KiB each at 256 members).

    MQTT 5 (CONNACK properties): ``max_packet_bytes`` is announced as the Maximum
    Packet Size (the whole packet). ``topic_alias_maximum`` aliases per connection in
    each direction (32: a device uses a handful of topics, a gateway a few per
    conversation; each costs one dict entry). ``receive_maximum``: unacknowledged
    QoS 1/2 PUBLISH packets a client may have towards us (65,535, the protocol's
    default, is not announced: our PUBACK waits for a group commit of a few ms, and
    the per-participant rate above is what bounds a flood). ``max_keepalive_s``: a
    client asking for a longer keep-alive, or none, is told this one as Server Keep
    Alive (0: none imposed; satellite devices choose long keep-alives on purpose).
    """

    max_packet_bytes: int = Field(default=131_072, ge=1024)  # > one 64 KiB envelope + header
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_pending_per_address: int = Field(default=16, ge=0)
    max_pending: int | None = Field(default=None, ge=1)  # None: max_connections // 2
    keepalive_factor: float = Field(default=1.5, ge=1.0)  # MQTT-3.1.2-24
    max_inflight: int = Field(default=100, ge=1, le=65_535)
    max_queued_messages: int = Field(default=100_000, ge=1)
    max_queued_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_connections: int = Field(default=1024, ge=1)
    max_subscriptions: int = Field(default=1024, ge=1)
    auth_failure_delay_s: float = Field(default=0.5, ge=0)
    rate_messages_per_s: float = Field(default=1000.0, ge=0)
    rate_messages_burst: float = Field(default=20_000.0, ge=1)
    rate_bytes_per_s: float = Field(default=1024.0 * 1024, ge=0)
    rate_bytes_burst: float = Field(default=16.0 * 1024 * 1024, ge=1024)
    max_founded: int = Field(default=100, ge=0)
    founding_window_s: float = Field(default=86_400.0, gt=0)
    max_bundle_bytes: int = Field(default=16 * 1024, ge=1024)
    max_status_bytes: int = Field(default=1024, ge=16)
    topic_alias_maximum: int = Field(default=32, ge=0, le=65_535)
    receive_maximum: int = Field(default=65_535, ge=1, le=65_535)
    max_keepalive_s: int = Field(default=0, ge=0, le=65_535)

    @property
    def pending_cap(self) -> int:
        """Connections waiting for their CONNECT, in all."""
        if self.max_pending is not None:
            return self.max_pending
        return max(1, self.max_connections // 2)


class TlsConfig(_Frozen):
    """Certificate and key (PEM) for the TLS listener and, when enabled, for WSS."""

    certfile: Path
    keyfile: Path
    port: Port = 8883


class BrokerConfig(_Frozen):
    """Everything the embedded broker needs.

    ``on_not_member``: what a PUBLISH to a conversation the sender is not (or no
    longer) a member of gets. MQTT 3.1.1 has no negative PUBACK, so the only visible
    answer is a disconnect; but such a publish is usually a race (a device's outbox
    still holds messages for a conversation it was just removed from), and a
    disconnect would make the device resend it forever. So by default it is
    acknowledged, dropped, logged and counted (``reason="not_member"``). Publishes
    that can only be bugs or attacks (wildcards, ``$`` topics, another participant's
    ``p/…`` topics, topics outside the prefix) always disconnect.

    ``port=0`` (and ``ws_port=0``…) picks an ephemeral port; read the bound one
    from :attr:`EmbeddedBroker.port`. ``data_dir`` holds ``fieldchat.broker.sqlite3``
    (accounts, memberships, sessions, queues, retained messages).
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: Port = 1883
    tls: TlsConfig | None = None
    ws_port: Port | None = None
    ws_tls: bool = False
    metrics_port: Port | None = None
    prefix: str = DEFAULT_PREFIX
    persistence: bool = True
    on_not_member: Literal["drop", "disconnect"] = "drop"
    limits: Limits = Field(default_factory=Limits)

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        try:
            Topics(value)
        except InvalidId as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def db_path(self) -> Path:
        return self.data_dir / "broker.sqlite3"
