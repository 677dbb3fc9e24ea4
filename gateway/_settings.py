"""Gateway configuration: one pydantic-settings model read at the edges (CLI, app factory).

Sources, highest priority first: keyword arguments (CLI flags), environment variables
``FIELDCHAT_GATEWAY_*``, a TOML file (``--config``), then the defaults below. Secrets
are :class:`~pydantic.SecretStr` and never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fieldchat.schemas import DEFAULT_PREFIX
from fieldchat.schemas.errors import ConfigError

__all__ = [
    "MAX_BODY_BYTES",
    "WS_MAX_MESSAGE_BYTES",
    "GatewaySettings",
    "canonical_origin",
    "load_settings",
]

# The largest request body, on every route. The largest legitimate one is a claim
# (``POST /v1/me/participants``): a bundle with ML-KEM is 1,327 bytes, 1,772 in base64,
# plus a challenge and a signature: 1,951 bytes of JSON. 64 KiB leaves room for growth
# and refuses the 200 MB bodies that raised a gateway's memory by 560 MB (issue 13).
MAX_BODY_BYTES = 65_536
# The largest WebSocket message uvicorn accepts before it closes the socket (1009).
# The largest legitimate one is a publish of a 64 KiB envelope: 87,384 bytes of base64
# in a JSON frame (``gateway._ws.MAX_FRAME_BYTES``, which the app checks itself).
WS_MAX_MESSAGE_BYTES = 262_144
_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_origin(scheme: str, netloc: str) -> str:
    """``scheme://host[:port]``: lower case, the default port left out, so two spellings
    of one origin compare equal (a claim and a signed request sign this form).

    Raises:
        ValueError: not http(s), or no host.
    """
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS or not netloc or any(c in netloc for c in "/?#@ "):
        raise ValueError(f"not an http(s) origin: {scheme}://{netloc[:80]}")
    parts = urlsplit(f"{scheme}://{netloc}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"no host in {netloc[:80]!r}")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port  # ValueError for a port that is not a number in range
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class GatewaySettings(BaseSettings):
    """Everything the gateway reads from its environment.

    ``database_url``: ``sqlite:///path.db`` (default, embedded) or ``postgresql://…``.
    ``share_group``: when set, envelopes are archived through the MQTT v5 shared
    subscription ``$share/{share_group}/…`` so several gateways split the work;
    rosters, bundles, statuses and inbox grants stay plain subscriptions, every
    gateway needs all of them to verify and to serve its WebSocket clients.
    """

    model_config = SettingsConfigDict(
        env_prefix="FIELDCHAT_GATEWAY_", extra="forbid", frozen=True, validate_default=True
    )

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # Reverse proxies whose X-Forwarded-For/-Proto is trusted (comma-separated
    # addresses, as uvicorn's --forwarded-allow-ips); None: no proxy headers are read.
    forwarded_allow_ips: str | None = None
    # The origin browsers and devices use for this gateway (``https://chat.example.org``),
    # which claims and signed requests are bound to. None: each request's own
    # scheme and Host (see docs/gateway.md, "Which origin"); set it behind a proxy.
    public_origin: str | None = None
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    database_url: str = "sqlite:///fieldchat-gateway.db"

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_client_id: str = "fieldchat-gateway"
    # CA certificate(s) (PEM) that sign the broker's TLS certificate, for ``mqtts://`` to a
    # broker with a private CA (Mosquitto with its own certificates); None: system trust.
    mqtt_ca_file: Path | None = None
    # "5" (session expiry, Receive Maximum, reason codes; every broker fieldchat ships
    # with, the embedded one included) or "3.1.1" (persistence via clean_session=False).
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    # With "5": connect again with 3.1.1 when the broker refuses MQTT 5.
    mqtt_fallback_311: bool = True
    topic_prefix: str = DEFAULT_PREFIX
    share_group: str | None = None
    # MQTT v5 session expiry: the broker keeps our queue this long while we are away.
    session_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 7 * 24 * 3600
    # MQTT v5 Receive Maximum: un-acknowledged envelopes the broker may have in flight to
    # us; it bounds our in-memory queue because we acknowledge only after the commit.
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 4096

    # Routing canaries (gateway._routing; docs/gateway.md "Routing"): one at each
    # connection, then every canary_interval_s (0: none), and a failure when it is not
    # back within canary_timeout_s. A canary crosses the broker and a commit in
    # milliseconds; 5 s leaves room for a slow commit on a busy machine, and a lost
    # subscription is found within 35 s for a 32-byte publish and a row every 30 s.
    canary_interval_s: Annotated[float, Field(ge=0)] = 30.0
    canary_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0

    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 1000
    batch_wait_s: Annotated[float, Field(ge=0, le=5)] = 0.02
    verify_workers: Annotated[int, Field(ge=1, le=64)] = 2
    pending_ttl_s: Annotated[float, Field(gt=0)] = 7 * 24 * 3600
    pending_retry_s: Annotated[float, Field(gt=0)] = 30.0
    pending_max: Annotated[int, Field(ge=1)] = 100_000
    # Quotas that keep one member or one signer from using what all conversations share
    # (issue 13; docs/gateway.md "Quotas"). Refusals are counted by reason in
    # fieldchat_gateway_rejected_total and logged once a minute.
    pending_per_conversation_max: Annotated[int, Field(ge=1)] = 2_000
    pending_per_sender_max: Annotated[int, Field(ge=1)] = 500  # per (cid, epoch, sender index)
    held_rosters_per_conversation_max: Annotated[int, Field(ge=1)] = 16
    held_rosters_max: Annotated[int, Field(ge=1)] = 10_000
    founding_max: Annotated[int, Field(ge=1)] = 100  # epoch-0 rosters per signer per window
    founding_window_s: Annotated[float, Field(gt=0)] = 24 * 3600
    feed_poll_s: Annotated[float, Field(gt=0, le=60)] = 0.5

    allow_registration: bool = True
    cookie_secure: bool | None = None  # None: Secure exactly when TLS is on
    session_ttl_s: Annotated[int, Field(ge=60)] = 14 * 24 * 3600
    argon2_time_cost: Annotated[int, Field(ge=1, le=20)] = 3
    argon2_memory_kib: Annotated[int, Field(ge=8, le=4 * 1024 * 1024)] = 65536
    argon2_parallelism: Annotated[int, Field(ge=1, le=16)] = 4
    # Failed logins per user name (from clients without a device cookie), per address
    # and per device cookie, in the window; attempts in flight count (docs/gateway.md).
    login_attempts: Annotated[int, Field(ge=1)] = 5
    login_window_s: Annotated[float, Field(gt=0)] = 60.0
    device_cookie_ttl_s: Annotated[int, Field(ge=60)] = 365 * 24 * 3600
    # Registrations per client address in the window (each costs an argon2 hash).
    register_attempts: Annotated[int, Field(ge=1)] = 10
    register_window_s: Annotated[float, Field(gt=0)] = 3600.0
    claim_challenge_ttl_s: Annotated[int, Field(ge=10, le=3600)] = 120
    max_body_bytes: Annotated[int, Field(ge=4096)] = MAX_BODY_BYTES
    ws_max_message_bytes: Annotated[int, Field(ge=131_072)] = WS_MAX_MESSAGE_BYTES
    ws_queue_max: Annotated[int, Field(ge=1)] = 10_000
    request_clock_skew_s: Annotated[int, Field(ge=1)] = 300

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.split("+")[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("database_url must be sqlite:///… or postgresql://…")
        return value

    @field_validator("public_origin")
    @classmethod
    def _check_origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError("public_origin is scheme://host[:port], nothing after it")
        return canonical_origin(parts.scheme, parts.netloc)

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("mqtt_url must be mqtt://host:port or mqtts://host:port")
        return value

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    @property
    def secure_cookies(self) -> bool:
        return self.tls if self.cookie_secure is None else self.cookie_secure

    @property
    def mqtt_host(self) -> str:
        host = urlsplit(self.mqtt_url).hostname
        assert host is not None  # checked by the validator
        return host

    @property
    def mqtt_port(self) -> int:
        parts = urlsplit(self.mqtt_url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files: explicit
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - sources only
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


def load_settings(config: Path | None = None, **overrides: Any) -> GatewaySettings:  # noqa: ANN401
    """Build settings from flags (``overrides``; ``None`` values are ignored), env and TOML.

    Raises:
        ConfigError: a missing file or an invalid value.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config is not None and not config.is_file():
        raise ConfigError(f"configuration file {config} not found")

    class _FromFile(GatewaySettings):
        model_config = SettingsConfigDict(toml_file=config)

    try:
        settings = _FromFile(**given) if config is not None else GatewaySettings(**given)
    except ValueError as exc:  # pydantic.ValidationError and TOML decode errors
        raise ConfigError(f"invalid gateway configuration: {exc}") from exc
    return settings
