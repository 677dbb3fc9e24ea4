"""Device configuration: frozen option groups for the library, settings for the edge.

The library (:class:`device.client.Device`) takes :class:`BrokerOptions` and
:class:`LinkOptions`; it never reads the environment. :class:`DeviceSettings` is
the pydantic-settings model the CLI builds from flags, ``FIELDCHAT_*`` variables
and a TOML file (in that order of precedence), then turns into option groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fieldchat.schemas.errors import ConfigError
from fieldchat.schemas.frame import MAX_FRAME_ENVELOPES
from fieldchat.schemas.roster import Policy
from fieldchat.schemas.topics import DEFAULT_PREFIX

__all__ = [
    "DEFAULT_STATE",
    "BrokerOptions",
    "DeviceSettings",
    "LinkOptions",
    "TlsOptions",
    "low_bandwidth_policy",
    "parse_broker_url",
    "parse_broker_urls",
]

DEFAULT_STATE = Path("~/.local/share/fieldchat/device.sqlite3")
DEFAULT_CONFIG = Path("~/.config/fieldchat/device.toml")

Protocol = Literal["auto", "5", "3.1.1"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsOptions(_Frozen):
    """TLS to the broker. ``ca_file`` ``None`` uses the system trust store."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class BrokerOptions(_Frozen):
    """Where and how to log in. ``username`` defaults to the device's pid.

    ``fallbacks``: more ``(host, port)`` of the same broker (cluster nodes), tried in
    turn when a connection to the current one cannot be made; the device stays with
    the address that worked. Same credential and TLS settings for all.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    tls: TlsOptions | None = None
    username: str | None = None
    credential: SecretStr | None = None
    protocol: Protocol = "auto"
    fallbacks: tuple[tuple[str, Annotated[int, Field(ge=1, le=65535)]], ...] = ()

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.fallbacks)


class LinkOptions(_Frozen):
    """Timing and batching of the link; :meth:`low_bandwidth` tunes it for slow links.

    ``keepalive_s``: MQTT keep-alive; a slow link wants fewer PINGREQs.
    ``backoff_min_s``/``backoff_max_s``: reconnect delay, doubled per failure, with
    full jitter so a fleet that lost its broker does not come back in lock step.
    ``receipt_interval_s``: delivered/read receipts are batched this long.
    ``resend_after_s``: after a reconnect, own messages published before it that
    some member has not receipted are published again this much later (the broker
    may have lost them: Mosquitto's snapshot, aMQTT's in-flight QoS 1). A loss that a
    later envelope of ours reveals is asked for at once (a MISSING receipt); this
    covers the last ones of a burst, which nothing reveals, and nothing is shown
    after those to be out of order with them: waiting lets the receipts of what did
    arrive come back first, so those are not sent twice.
    ``resend_window_s``: only messages this recent are resent that way; older ones
    are left to the gateway's history.
    ``reorder_window_s``: a message that overtook a missing one of the same sender
    waits this long for it before it is shown (and the gap recorded); meanwhile the
    sender is asked for it four times (MISSING receipts at 0, ⅛, ⅜, ⅞ of it). A
    repair takes a round trip to the sender and back: 3-5 ms on loopback, 2 RTT on a
    slow link (BENCHMARKS.md ``gap_repair_ms``); 2 s holds a repair from the first
    ask up to a 1 s round trip, from the third up to 0.6 s.
    ``window``: PUBLISH packets in flight (unacknowledged) at once.
    ``frame_envelopes``: at most this many queued envelopes of one conversation leave
    in one PUBLISH, a frame (PROTOCOL.md §3.4); 1 sends each alone, for a peer that
    predates frames. Nothing waits to fill a frame: only a backlog is framed.
    ``history_tail_s``: with a history source, how often an idle device asks it for
    what was archived after its cursor (also shortly after each connect): messages
    lost at the end of a run (a broker queue overflowing, a failover) reveal no gap.
    A slow link wants it rarer (an empty answer is one small HTTP exchange a round).
    ``presence``: follow the status topics of the members of our conversations and
    report their changes (``PresenceChanged``); each change of a member costs one
    retained PUBLISH of ≈ 45 bytes here (docs/device.md, "Presence"). Off in
    :meth:`low_bandwidth`.
    ``archive_check_s``: with a gateway, own envelopes are kept until the archive has
    them; while some are not confirmed, the device checks this often (and after each
    reconnect once its outbox drained) and uploads what the archive lacks. Every
    own envelope is named once, by 16 bytes of its digest: ≈ 40 bytes of request
    each, plus ≈ 1 KB of HTTP per check, so a rarer check batches more (BENCHMARKS.md
    ``archive_check_bytes_per_message``).
    """

    keepalive_s: Annotated[int, Field(ge=5, le=65535)] = 60
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    backoff_min_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    receipt_interval_s: Annotated[float, Field(gt=0)] = 1.0
    read_receipts: bool = True
    resend_after_s: Annotated[float, Field(ge=0)] = 5.0
    resend_window_s: Annotated[float, Field(ge=0)] = 120.0
    gap_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    reorder_window_s: Annotated[float, Field(ge=0)] = 2.0
    window: Annotated[int, Field(ge=1, le=1024)] = 64
    frame_envelopes: Annotated[int, Field(ge=1, le=MAX_FRAME_ENVELOPES)] = MAX_FRAME_ENVELOPES
    topic_aliases: bool = True
    history_tail_s: Annotated[float, Field(gt=0)] = 60.0
    archive_check_s: Annotated[float, Field(gt=0)] = 30.0
    presence: bool = True

    @classmethod
    def low_bandwidth(cls) -> LinkOptions:
        """Slow-link tuning: rare pings, receipts batched for 30 s, no read receipts,
        no presence, a 12 s reorder window (a repair within it from the first ask with round trips
        up to 6 s, from the third up to 3.75 s: satellite and congested cellular)."""
        return cls(
            keepalive_s=600,
            connect_timeout_s=60.0,
            backoff_min_s=2.0,
            backoff_max_s=300.0,
            receipt_interval_s=30.0,
            read_receipts=False,
            resend_after_s=60.0,
            reorder_window_s=12.0,
            history_tail_s=900.0,
            archive_check_s=900.0,
            presence=False,
        )


def low_bandwidth_policy(*, sign_every: int = 32) -> Policy:
    """Conversation policy for slow links: compressed plaintext, one signature per 32.

    Unsigned steps are still authenticated against outsiders by AES-GCM; only other
    members could forge them (DESIGN.md, Sender authentication).
    """
    return Policy(compress=True, sign_every=sign_every)


def parse_broker_urls(urls: str) -> tuple[list[tuple[str, int]], bool]:
    """A comma-separated list of broker URLs (cluster nodes) to addresses and TLS.

    Raises:
        ConfigError: a bad URL, or a list mixing mqtt:// and mqtts://.
    """
    parsed = [parse_broker_url(u.strip()) for u in urls.split(",") if u.strip()]
    if not parsed:
        raise ConfigError("no broker URL given")
    if len({tls for _, _, tls in parsed}) > 1:
        raise ConfigError("broker URLs mix mqtt:// and mqtts://: use one scheme for all nodes")
    return [(host, port) for host, port, _ in parsed], parsed[0][2]


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` to ``(host, port, tls)``.

    Raises:
        ConfigError: another scheme, or no host.
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {url!r}: use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    return parts.hostname, port, tls


class DeviceSettings(BaseSettings):
    """Everything the CLI needs; read at the edge only.

    Sources, highest first: flags, ``FIELDCHAT_*`` environment variables, the TOML
    file (``--config``, ``FIELDCHAT_CONFIG`` or ``~/.config/fieldchat/device.toml``),
    then values saved in the state file by ``fieldchat device init``.
    """

    model_config = SettingsConfigDict(env_prefix="FIELDCHAT_", extra="forbid")

    state: Path = DEFAULT_STATE
    broker: str | None = None
    credential: SecretStr | None = None
    gateway: str | None = None  # http(s)://host:port: history for what was sent while away
    username: str | None = None
    prefix: str = DEFAULT_PREFIX
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Protocol = "auto"
    low_bandwidth: bool = False
    keepalive: int | None = None
    power_safe: bool = False  # send returns once a power cut cannot lose it (an fsync each)
    presence: bool | None = None  # follow members' presence (None: the link profile's choice)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - nor secret dirs
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: object) -> DeviceSettings:
        """Settings from flags (``None`` means not given), environment and TOML.

        Raises:
            ConfigError: unreadable TOML, unknown keys or invalid values.
        """
        path = (config_file or DEFAULT_CONFIG).expanduser()
        if config_file is not None and not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        bound = type(
            "BoundDeviceSettings",
            (cls,),
            {"model_config": {**cls.model_config, "toml_file": path if path.is_file() else None}},
        )
        given = {k: v for k, v in flags.items() if v is not None}
        try:
            settings = bound(**given)
        except ValueError as exc:  # pydantic ValidationError and TOML decode errors
            first = str(exc).splitlines()
            raise ConfigError(f"invalid configuration: {' '.join(first[:3])}") from None
        return cls.model_validate(settings.model_dump())

    def broker_options(
        self, saved_broker: str | None, saved_credential: str | None
    ) -> BrokerOptions:
        """Option group for the library, completing missing values from the state file.

        Raises:
            ConfigError: bad broker URL.
        """
        url = self.broker or saved_broker or "mqtt://127.0.0.1:1883"
        addresses, tls = parse_broker_urls(url)
        (host, port), fallbacks = addresses[0], tuple(addresses[1:])
        tls_options = None
        if tls or self.ca_file or self.cert_file:
            tls_options = TlsOptions(
                ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file
            )
        credential = self.credential or (SecretStr(saved_credential) if saved_credential else None)
        return BrokerOptions(
            host=host,
            port=port,
            tls=tls_options,
            username=self.username,
            credential=credential,
            protocol=self.protocol,
            fallbacks=fallbacks,
        )

    def link_options(self) -> LinkOptions:
        base = LinkOptions.low_bandwidth() if self.low_bandwidth else LinkOptions()
        if self.keepalive is not None:
            base = base.model_copy(update={"keepalive_s": self.keepalive})
        if self.presence is not None:
            base = base.model_copy(update={"presence": self.presence})
        return base
