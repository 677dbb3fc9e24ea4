"""The two topologies under test, started through the real CLI as an operator would.

* ``embedded``: ``fieldchat up`` (embedded broker + gateway on SQLite) in a data
  folder, on ephemeral ports that are kept across restarts.
* ``scaled``: Mosquitto from ``fieldchat broker mosquitto-config`` + two
  ``fieldchat gateway run`` sharing the archive (``share_group``) on one PostgreSQL
  database made for the run.

Mosquitto cannot verify rosters: its generated ACL lists the memberships the broker
data folder knows, which the embedded broker learns from the signed rosters it
relays. So the scaled stack starts as a *bootstrap* (``fieldchat broker run`` on
that folder, one gateway archiving rosters and bundles into PostgreSQL) while the
devices register and found their conversations, then moves to production:
``mosquitto-config``, Mosquitto, both gateways (MQTT 5) — docs/deploy.md, §1-3.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

from bench._soak.procs import (
    FIELDCHAT,
    Proc,
    Registry,
    SoakError,
    child_env,
    free_port,
    http_ok,
    port_open,
    run,
    wait_until,
)

__all__ = ["MOSQUITTO", "PG_ADMIN_URLS", "Embedded", "Scaled", "scaled_unavailable"]

MOSQUITTO = "/usr/sbin/mosquitto"
PG_ADMIN_URLS = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)
START_TIMEOUT_S = 90.0  # a service restart on 2 busy cores; past it the soak gives up
SHARE_GROUP = "archive"
_WEB = re.compile(r"web\s+http://127\.0\.0\.1:(\d+)/")
_MQTT = re.compile(r"mqtt\s+mqtt://127\.0\.0\.1:(\d+)")
_LISTENING = re.compile(r"listening on mqtt://127\.0\.0\.1:(\d+)")


def _grep(path: Path, pattern: re.Pattern[str]) -> re.Match[str] | None:
    try:
        return pattern.search(path.read_text(errors="replace"))
    except OSError:
        return None


class Embedded:
    """``fieldchat up``: the broker and the gateway are one process."""

    name = "embedded"

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = root
        self.data = root / "up"
        self.registry = registry
        self.mqtt_port = 0
        self.http_port = 0
        self.up: Proc | None = None

    # -- the stack ---------------------------------------------------------------------

    def start(self) -> None:
        log = self.root / "logs" / "up.log"
        self.up = self.registry.add(Proc("up", self._argv(), log, env=child_env()))
        self.up.start()
        wait_until(
            lambda: (_grep(log, _WEB) and _grep(log, _MQTT)) or self._exited(),
            START_TIMEOUT_S,
            f"`fieldchat up` to print its banner (log: {log})",
        )
        web, mqtt = _grep(log, _WEB), _grep(log, _MQTT)
        if web is None or mqtt is None:
            raise SoakError(f"`fieldchat up` exited at start: {self.up.tail()}")
        self.http_port, self.mqtt_port = int(web.group(1)), int(mqtt.group(1))
        self.up.argv = self._argv()  # restarts keep the ports the devices know
        self.wait_ready(self.up)

    def _argv(self) -> list[str]:
        return [
            *FIELDCHAT,
            "up",
            "--data-dir",
            str(self.data),
            "--mqtt-port",
            str(self.mqtt_port),
            "--http-port",
            str(self.http_port),
        ]

    def _exited(self) -> bool:
        return self.up is not None and not self.up.alive()

    def production(self, cids: list[str] | None = None) -> None:
        """Nothing to move: the devices already use the stack they registered on."""

    def stop(self) -> None:
        if self.up is not None and self.up.alive():
            self.up.stop(signal.SIGINT)

    def cleanup(self) -> None:
        pass

    # -- what the soak needs --------------------------------------------------------------

    @property
    def broker_data(self) -> Path:
        return self.data / "broker"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.http_port}/"]

    def device_flags(self, index: int) -> list[str]:  # noqa: ARG002 - one stack for all
        return ["--broker", self.mqtt_url, "--gateway", self.gateway_urls[0]]

    def setup_flags(self) -> list[str]:
        return self.device_flags(0)

    def role(self, role: str) -> list[Proc]:
        """The processes a chaos event of ``role`` may target."""
        assert self.up is not None
        return [self.up] if role == "broker" else []

    def wait_ready(self, proc: Proc) -> None:
        """After a (re)start: the MQTT port answers and /healthz is 200 (the archiver
        is connected)."""
        wait_until(
            lambda: (
                not proc.alive()
                or (port_open(self.mqtt_port) and http_ok(f"{self.gateway_urls[0]}healthz"))
            ),
            START_TIMEOUT_S,
            f"{proc.name} to serve again (log: {proc.log})",
        )
        if not proc.alive():
            raise SoakError(f"{proc.name} exited at start: {proc.tail()}")


class Scaled:
    """Mosquitto (generated config) + two gateways + PostgreSQL."""

    name = "scaled"

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = root
        self.registry = registry
        self.broker_data = root / "broker"
        self.mosquitto_dir = root / "mosquitto"
        self.mqtt_port = free_port()
        self.gateway_ports = [free_port(), free_port()]
        self.database = f"fcsoak_{uuid.uuid4().hex[:12]}"
        self.admin_url: str | None = None
        self.creds: list[tuple[str, str]] = []
        self.bootstrap_broker: Proc | None = None
        self.bootstrap_port = 0
        self.mosquitto: Proc | None = None
        self.gateways: list[Proc] = []
        self._ports: dict[str, int] = {}  # gateway process name -> HTTP port

    @property
    def database_url(self) -> str:
        assert self.admin_url is not None
        return self.admin_url.rsplit("/", 1)[0] + f"/{self.database}"

    # -- bootstrap -------------------------------------------------------------------------

    def start(self) -> None:
        self.admin_url = asyncio.run(_create_database(self.database))
        run([*FIELDCHAT, "gateway", "migrate", "--database-url", self.database_url], what="migrate")
        for i in (1, 2):
            out = run(
                [
                    *FIELDCHAT,
                    "broker",
                    "gateway",
                    f"archive-{i}",
                    "--data-dir",
                    str(self.broker_data),
                ],
                what="broker gateway",
            )
            username, credential = out.split()
            self.creds.append((username, credential))
        log = self.root / "logs" / "bootstrap-broker.log"
        self.bootstrap_broker = self.registry.add(
            Proc(
                "bootstrap-broker",
                [
                    *FIELDCHAT,
                    "broker",
                    "run",
                    "--data-dir",
                    str(self.broker_data),
                    "--port",
                    "0",
                    "--log-level",
                    "WARNING",
                ],
                log,
                env=child_env(),
            )
        )
        self.bootstrap_broker.start()
        broker = self.bootstrap_broker
        wait_until(
            lambda: _grep(log, _LISTENING) or not broker.alive(),
            START_TIMEOUT_S,
            f"the bootstrap broker (log: {log})",
        )
        found = _grep(log, _LISTENING)
        if found is None:
            raise SoakError(f"the bootstrap broker exited: {broker.tail()}")
        self.bootstrap_port = int(found.group(1))
        # One gateway archives the rosters and bundles while the devices found their
        # conversations: the production gateways verify against that archive.
        gateway = self._gateway(
            0, f"mqtt://127.0.0.1:{self.bootstrap_port}", "3.1.1", None, "bootstrap-gateway"
        )
        self.registry.add(gateway).start()
        self._wait_gateway(gateway)
        self.gateways = [gateway]

    def setup_flags(self) -> list[str]:
        return [
            "--broker",
            f"mqtt://127.0.0.1:{self.bootstrap_port}",
            "--gateway",
            self.gateway_urls[0],
        ]

    def production(self, cids: list[str] | None = None) -> None:
        """Stop the bootstrap; start Mosquitto with the generated config and both
        gateways on it. ``cids``: conversations whose roster must be archived first."""
        if cids:
            wait_until(
                lambda: asyncio.run(_rosters_archived(self.database_url, cids)),
                START_TIMEOUT_S,
                "the bootstrap gateway to archive the rosters",
            )
        for proc in (*self.gateways, self.bootstrap_broker):
            if proc is not None:
                proc.stop(signal.SIGTERM)
        run(
            [
                *FIELDCHAT,
                "broker",
                "mosquitto-config",
                "--out",
                str(self.mosquitto_dir),
                "--data-dir",
                str(self.broker_data),
                "--port",
                str(self.mqtt_port),
                "--user",
                getpass.getuser(),
            ],
            what="broker mosquitto-config",
        )
        self.mosquitto = self.registry.add(
            Proc(
                "mosquitto",
                [MOSQUITTO, "-c", str(self.mosquitto_dir / "mosquitto.conf")],
                self.root / "logs" / "mosquitto.log",
            )
        )
        self.mosquitto.start()
        self.wait_ready(self.mosquitto)
        url = f"mqtt://127.0.0.1:{self.mqtt_port}"
        self.gateways = [self.registry.add(self._gateway(i, url, "5", SHARE_GROUP)) for i in (0, 1)]
        for gateway in self.gateways:
            gateway.start()
        for gateway in self.gateways:
            self._wait_gateway(gateway)

    def _gateway(
        self, index: int, mqtt_url: str, protocol: str, share: str | None, name: str = ""
    ) -> Proc:
        username, credential = self.creds[index]
        name = name or f"gateway-{index + 1}"
        self._ports[name] = self.gateway_ports[index]
        workdir = self.root / f"gateway-{index + 1}"
        workdir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.gateway_ports[index],
            "database_url": self.database_url,
            "mqtt_url": mqtt_url,
            "mqtt_username": username,
            "mqtt_password": credential,
            "mqtt_client_id": username,  # Mosquitto: use_username_as_clientid
            "mqtt_protocol": protocol,
        }
        if share:
            settings["share_group"] = share
        config = workdir / f"gateway-{protocol}.toml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            for key, value in settings.items():
                shown = value if isinstance(value, int) else f'"{value}"'  # TOML
                out.write(f"{key} = {shown}\n")
        return Proc(
            name,
            [*FIELDCHAT, "gateway", "run", "--config", str(config)],
            self.root / "logs" / f"{name}.log",
            env=child_env(),
        )

    def _wait_gateway(self, proc: Proc) -> None:
        port = self._ports[proc.name]
        wait_until(
            lambda: not proc.alive() or http_ok(f"http://127.0.0.1:{port}/healthz"),
            START_TIMEOUT_S,
            f"{proc.name} to be healthy (log: {proc.log})",
        )
        if not proc.alive():
            raise SoakError(f"{proc.name} exited at start: {proc.tail()}")

    def stop(self) -> None:
        for proc in (*self.gateways, self.mosquitto, self.bootstrap_broker):
            if proc is not None and proc.alive():
                proc.stop(signal.SIGTERM)

    def cleanup(self) -> None:
        if self.admin_url is not None:
            asyncio.run(_drop_database(self.admin_url, self.database))
            self.admin_url = None

    # -- what the soak needs --------------------------------------------------------------

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/" for port in self.gateway_ports]

    def device_flags(self, index: int) -> list[str]:
        """Mosquitto (MQTT 5; the state file remembers 3.1.1 from the bootstrap), and
        the gateways in turn for history."""
        gateway = self.gateway_urls[index % len(self.gateway_urls)]
        return ["--broker", self.mqtt_url, "--protocol", "5", "--gateway", gateway]

    def role(self, role: str) -> list[Proc]:
        if role == "broker":
            assert self.mosquitto is not None
            return [self.mosquitto]
        return list(self.gateways) if role == "gateway" else []

    def wait_ready(self, proc: Proc) -> None:
        if proc is self.mosquitto:
            wait_until(
                lambda: not proc.alive() or port_open(self.mqtt_port),
                START_TIMEOUT_S,
                f"Mosquitto to listen (log: {proc.log})",
            )
            if not proc.alive():
                raise SoakError(f"mosquitto exited at start: {proc.tail()}")
        else:
            self._wait_gateway(proc)


def scaled_unavailable() -> str | None:
    """Why the scaled topology cannot run here, or None."""
    if shutil.which(MOSQUITTO) is None:
        return f"{MOSQUITTO} is not installed"
    try:
        asyncio.run(_admin())
    except SoakError as exc:
        return str(exc)
    return None


async def _admin() -> tuple[Any, str]:
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - scaled topology only

    for url in PG_ADMIN_URLS:
        try:
            return await asyncpg.connect(url, timeout=3), url
        except (OSError, asyncpg.PostgresError):
            continue
    raise SoakError("PostgreSQL is not reachable on 127.0.0.1:5432")


async def _create_database(name: str) -> str:
    conn, url = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return str(url)


async def _drop_database(admin_url: str, name: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _rosters_archived(database_url: str, cids: list[str]) -> bool:
    from fieldchat.gateway import open_store  # noqa: PLC0415

    store = open_store(database_url)
    try:
        return all([await store.roster(cid, 0) is not None for cid in cids])
    finally:
        await store.close()
