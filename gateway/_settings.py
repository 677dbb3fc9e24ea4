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

from schemas import DEFAULT_PREFIX
from schemas.errors import ConfigError

__all__ = ["GatewaySettings", "load_settings"]


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

    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 1000
    batch_wait_s: Annotated[float, Field(ge=0, le=5)] = 0.02
    verify_workers: Annotated[int, Field(ge=1, le=64)] = 2
    pending_ttl_s: Annotated[float, Field(gt=0)] = 7 * 24 * 3600
    pending_retry_s: Annotated[float, Field(gt=0)] = 30.0
    pending_max: Annotated[int, Field(ge=1)] = 100_000
    feed_poll_s: Annotated[float, Field(gt=0, le=60)] = 0.5

    allow_registration: bool = True
    cookie_secure: bool | None = None  # None: Secure exactly when TLS is on
    session_ttl_s: Annotated[int, Field(ge=60)] = 14 * 24 * 3600
    argon2_time_cost: Annotated[int, Field(ge=1, le=20)] = 3
    argon2_memory_kib: Annotated[int, Field(ge=8, le=4 * 1024 * 1024)] = 65536
    argon2_parallelism: Annotated[int, Field(ge=1, le=16)] = 4
    login_attempts: Annotated[int, Field(ge=1)] = 5  # per user name and per address
    login_window_s: Annotated[float, Field(gt=0)] = 60.0
    ws_queue_max: Annotated[int, Field(ge=1)] = 10_000
    request_clock_skew_s: Annotated[int, Field(ge=1)] = 300

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.split("+")[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("database_url must be sqlite:///… or postgresql://…")
        return value

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
