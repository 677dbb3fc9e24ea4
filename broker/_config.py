"""Broker configuration: frozen option groups, built at the edge (CLI, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.errors import InvalidId
from schemas.topics import DEFAULT_PREFIX, Topics

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
    """

    max_packet_bytes: int = Field(default=131_072, ge=1024)  # > one 64 KiB envelope + header
    connect_timeout_s: float = Field(default=10.0, gt=0)
    keepalive_factor: float = Field(default=1.5, ge=1.0)  # MQTT-3.1.2-24
    max_inflight: int = Field(default=100, ge=1, le=65_535)
    max_queued_messages: int = Field(default=100_000, ge=1)
    max_queued_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_connections: int = Field(default=1024, ge=1)
    max_subscriptions: int = Field(default=1024, ge=1)
    auth_failure_delay_s: float = Field(default=0.5, ge=0)


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
    from :attr:`EmbeddedBroker.port`. ``data_dir`` holds ``broker.sqlite3``
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
