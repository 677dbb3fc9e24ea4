"""Helpers and fixtures of the gateway tests: real Mosquitto, real SQLite and PostgreSQL, a real
uvicorn serving the app on 127.0.0.1, and participants made with the E2E engine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import asyncpg
import httpx
import pytest
import uvicorn

from fieldchat.device.engine import Engine, Publication
from fieldchat.device.identity import Identity
from fieldchat.gateway import (
    GatewaySettings,
    claim_message,
    create_app,
    open_store,
    signed_message,
    uvicorn_options,
)
from fieldchat.schemas import Policy, Topics
from fieldchat.schemas.roster import is_roster

MOSQUITTO = "/usr/sbin/mosquitto"
PG_ADMIN_URLS = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)
FAST_ARGON2: dict[str, Any] = {
    "argon2_time_cost": 1,
    "argon2_memory_kib": 64,
    "argon2_parallelism": 1,
}
DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(predicate: Any, what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll an (async or sync) predicate until truthy; bounded in time."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- Mosquitto ------------------------------------------------------------------------


class Mosquitto:
    """Mosquitto on an ephemeral port; ``persistence``: sessions and queues survive a
    restart (saved at a clean stop and every second), as in production."""

    def __init__(self, workdir: Path, *, persistence: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        saved = (
            f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
            if persistence
            else "persistence false\n"
        )
        (workdir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"{saved}"
            # The archiver acknowledges after its commit: let the broker queue for it.
            "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            "user root\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited at start")
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it: SIGTERM is a clean stop (state saved), SIGKILL a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own per test: tests share one broker."""
    return f"t{uuid.uuid4().hex[:10]}/v1"


# -- databases ------------------------------------------------------------------------


async def _pg_admin() -> tuple[asyncpg.Connection, str] | None:
    for url in PG_ADMIN_URLS:
        try:
            return await asyncpg.connect(url, timeout=3), url
        except (OSError, asyncpg.PostgresError):
            continue
    return None


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    found = await _pg_admin()
    if found is None:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    admin, admin_url = found
    name = f"fcgw_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Any]:
    db = open_store(database_url)
    await db.migrate()
    yield db
    await db.close()


# -- participants ---------------------------------------------------------------------


class Party:
    """A participant driven by the real E2E engine (tests only: the gateway never does)."""

    def __init__(self, topics: Topics, *, post_quantum: bool = True) -> None:
        self.engine = Engine(Identity.generate(post_quantum=post_quantum), topics=topics)

    @property
    def pid(self) -> str:
        return self.engine.pid

    @property
    def bundle(self) -> bytes:
        return self.engine.identity.bundle.to_bytes()

    def sign_request(
        self, method: str, path: str, query: str = "", *, host: str, nonce: str | None = None
    ) -> dict[str, str]:
        """Headers of a request signed for the gateway at ``host`` (``host[:port]``)."""
        stamp = str(int(time.time()))
        nonce = nonce or secrets.token_urlsafe(16)
        message = signed_message(method, path, query, stamp, host=host, nonce=nonce)
        sig = self.engine.identity.sign(message)
        return {
            "x-fieldchat-pid": self.pid,
            "x-fieldchat-time": stamp,
            "x-fieldchat-nonce": nonce,
            "x-fieldchat-signature": base64.urlsafe_b64encode(sig).decode().rstrip("="),
        }

    def prove(self, challenge: dict[str, Any], origin: str) -> dict[str, str]:
        """The body of ``POST /v1/me/participants``: this participant's bundle and its
        signature over the challenge, for the gateway at ``origin``."""
        message = claim_message(origin, challenge["account"], self.pid, challenge["challenge"])
        return {
            "bundle": base64.b64encode(self.bundle).decode(),
            "challenge": challenge["challenge"],
            "signature": base64.b64encode(self.engine.identity.sign(message)).decode(),
        }


async def claim(http: httpx.AsyncClient, party: Party, origin: str | None = None) -> httpx.Response:
    """Claim ``party`` for the logged-in account of ``http``, with its proof of possession
    for ``origin`` (default: the client's base URL)."""
    r = await http.post("/v1/me/participants/challenge", json={})
    assert r.status_code == 201, r.text
    where = origin or str(http.base_url).rstrip("/")
    return await http.post("/v1/me/participants", json=party.prove(r.json(), where))


@dataclass
class Conversation:
    cid: str
    parties: list[Party]
    publications: list[Publication] = field(default_factory=list)  # bundles, roster, grants

    def seal(self, party: Party, text: str) -> bytes:
        from fieldchat.schemas import TextMessage

        return party.engine.seal(self.cid, TextMessage(sent_at=int(time.time()), text=text))


def converse(topics: Topics, parties: list[Party], *, policy: Policy | None = None) -> Conversation:
    """Found a conversation among ``parties`` (the first is the creator) and exchange
    rosters and grants in memory; return everything that must also go to MQTT."""
    for p in parties:
        for q in parties:
            if p is not q:
                p.engine.learn_bundle(q.bundle)
    creator = parties[0]
    cid, pubs = creator.engine.create_conversation([p.pid for p in parties[1:]], policy=policy)
    out = [p.engine.bundle_publication() for p in parties]
    queue = list(pubs)
    by_pid = {p.pid: p for p in parties}
    while queue:
        pub = queue.pop(0)
        out.append(pub)
        where = topics.parse(pub.topic)
        if where.kind in ("roster", "propose"):  # the verifier retains what chains
            for p in parties[1:]:
                queue.extend(p.engine.handle_roster(pub.payload))
        elif where.kind == "inbox" and not is_roster(pub.payload):
            assert where.pid is not None  # earlier rosters sent to joiners: none at epoch 0
            by_pid[where.pid].engine.handle_grant(pub.payload)
    return Conversation(cid, parties, out)


async def archived_conversation(
    gw: RunningGateway, mosquitto: Mosquitto, prefix: str
) -> tuple[Party, Conversation]:
    """A device (no account) in a conversation with one message of its archived."""
    topics = Topics(prefix)
    device, peer = Party(topics), Party(topics)
    conv = converse(topics, [device, peer])
    await publish_all(mosquitto.url, pubs(conv.publications))
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), conv.seal(device, "hi"), False)])
    await eventually(lambda: gw.state.store.history(conv.cid), "the envelope archived")
    return device, conv


async def publish_all(url: str, items: list[tuple[str, bytes, bool]]) -> None:
    """Publish at QoS 1 with a throwaway client; returns after every PUBACK."""
    host, port = url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port), identifier=f"pub-{uuid.uuid4().hex[:8]}") as c:
        for topic, payload, retain in items:
            await c.publish(topic, payload, qos=1, retain=retain)


def pubs(items: list[Publication]) -> list[tuple[str, bytes, bool]]:
    return [(p.topic, p.payload, p.retain) for p in items]


# -- the gateway under uvicorn --------------------------------------------------------


class RunningGateway:
    def __init__(self, app: Any, server: uvicorn.Server, port: int) -> None:
        self.app = app
        self.server = server
        self.port = port
        self.host = f"127.0.0.1:{port}"  # what signed requests sign as HOST
        self.base = f"http://{self.host}"
        self.ws_base = f"ws://{self.host}"

    @property
    def state(self) -> Any:
        return self.app.state.gateway

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=20, **kw)


@contextlib.asynccontextmanager
async def serve_gateway(settings: GatewaySettings, **kw: Any) -> AsyncIterator[RunningGateway]:
    app = create_app(settings, **kw)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(settings)
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), "uvicorn to start")
    if task.done():
        task.result()
    port = server.servers[0].sockets[0].getsockname()[1]
    gw = RunningGateway(app, server, port)
    try:
        await eventually(gw.state.archiver.connected.is_set, "the archiver to connect")
        yield gw
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


class HasMqttUrl(Protocol):
    """What :func:`make_settings` reads of a broker: a Mosquitto, or a stand-in."""

    @property
    def url(self) -> str: ...


def make_settings(
    mosquitto: HasMqttUrl, prefix: str, database_url: str, **kw: Any
) -> GatewaySettings:
    values: dict[str, Any] = {
        "mqtt_url": mosquitto.url,
        "topic_prefix": prefix,
        "database_url": database_url,
        "mqtt_client_id": f"gw-{uuid.uuid4().hex[:8]}",
        "feed_poll_s": 0.2,
        "pending_retry_s": 1.0,
        "batch_wait_s": 0.01,
        **FAST_ARGON2,
    }
    values.update(kw)
    return GatewaySettings(**values)


@pytest.fixture
async def gateway(
    mosquitto: Mosquitto, prefix: str, database_url: str
) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(make_settings(mosquitto, prefix, database_url)) as gw:
        yield gw


async def login(
    gw: RunningGateway,
    username: str,
    party: Party | None = None,
    password: str = "correct horse battery",
) -> httpx.AsyncClient:
    """Register, log in, optionally register ``party`` as the account's participant."""
    client = gw.client()
    r = await client.post("/v1/accounts", json={"username": username, "password": password})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/session", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    if party is not None:
        r = await claim(client, party)
        assert r.status_code == 201, r.text
    return client


# -- gateway processes (scale-out, SIGKILL) -------------------------------------------


class GatewayProcess:
    """``fieldchat gateway run`` in a child process, configured by a TOML file.

    The MQTT password goes in the TOML file (0600), never on the command line.
    """

    def __init__(self, workdir: Path, **settings: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "gateway.toml"
        lines = [f"port = {self.port}", 'host = "127.0.0.1"']
        for key, value in {**FAST_ARGON2, **settings}.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value!r}")
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o600)
        self.log = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from fieldchat.cli import app; app()",
                    "gateway",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    async def healthy(self, timeout: float = 60.0) -> None:
        """``/healthz`` 200: the database is open and the archiver is connected."""

        async def ok() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.tail()}")
            try:
                async with httpx.AsyncClient(timeout=2) as c:
                    return (await c.get(f"{self.base}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ok, "the gateway to be healthy", timeout=timeout)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
