"""Gateway benchmarks (issue 5), each against its baseline in the same run.

* ``broker_msgs_per_s``: a bare paho subscriber on the local Mosquitto receiving a
  QoS 1 stream of real envelopes (from publish start to the last message).
* ``archive_msgs_per_s_sqlite`` / ``_postgres``: the archiver (verify every signature,
  batch commit, PUBACK after commit) on the same stream, from publish start to the
  last commit. ``archive_ratio_sqlite`` = archive / broker (target ≥ 1.0): the median
  of ``--rounds`` per-round ratios, baseline and archive alternating (each pair in
  ``archive_rounds``; the rates reported are the medians).
* ``history_page_p99_ms``: a 50-envelope page through the HTTP API (session cookie,
  membership check) from a 1,000,000-envelope SQLite store (target ≤ 5 ms), served by
  ``fieldchat gateway run`` in its own process and asked over one keep-alive
  connection on loopback; ``history_page_store_p99_ms`` is the store call alone.
* ``ws_fanout_p99_ms``: 1,000 WebSocket clients in one conversation, 20 envelopes/s
  for 30 s, publish-to-receive p99 (target ≤ 100 ms) and ``ws_lost`` (target 0).

Everything runs on 127.0.0.1 with ephemeral ports; every loop is bounded in count and
time. Usage: python bench/gateway.py [--messages N] [--store-rows N] [--ws-clients N]
[--ws-seconds S] [--skip-postgres] [--rounds N]
"""

# ruff: noqa: ANN401 - multiprocessing queues/events and paho callbacks are untyped here

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

# This file is named like the package it measures: import the package, not itself.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fieldchat.device.engine import Engine
from fieldchat.device.identity import Identity
from fieldchat.gateway import GatewaySettings, claim_message, open_store
from fieldchat.gateway._archiver import Archiver
from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.schemas import TextMessage, Topics

MOSQUITTO = "/usr/sbin/mosquitto"
PG_ADMIN = ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test")
FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1}
TEXT = "Pump 3 pressure 4.2 bar, valve B closed, back on site at 14:30"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # set_tcp_nodelay as `fieldchat broker mosquitto-config` writes it (without it,
    # Nagle's algorithm delays 1 PUBLISH in 100 by 25-30 ms: broker/_mosquitto.py).
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\nuser root\nset_tcp_nodelay true\n"
        f"log_dest file {workdir}/mosquitto.log\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, port
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


# -- participants and the stream -------------------------------------------------------


def conversation(topics: Topics) -> tuple[Engine, Engine, str, list]:
    """Two engines in one conversation; returns the publications to put on MQTT."""
    a = Engine(Identity.generate(), topics=topics)
    b = Engine(Identity.generate(), topics=topics)
    a.learn_bundle(b.identity.bundle.to_bytes())
    b.learn_bundle(a.identity.bundle.to_bytes())
    cid, pubs = a.create_conversation([b.pid])
    out = [a.bundle_publication(), b.bundle_publication()]
    for pub in pubs:
        out.append(pub)
        if pub.topic.endswith(("/roster", "/propose")):
            for back in b.handle_roster(pub.payload):
                out.append(back)
                a.handle_grant(back.payload)
        elif pub.topic == topics.inbox(b.pid):
            b.handle_grant(pub.payload)
    return a, b, cid, [(p.topic, p.payload, p.retain) for p in out]


def publish_proc(
    port: int, items: list[tuple[str, bytes, bool]], out: Any, rate: float | None = None
) -> None:
    """Child process: publish QoS 1 as fast as allowed (or at ``rate``/s); report times.

    The imported modules are frozen out of the cyclic collector first: a full collection
    of this process's heap took ≈ 140 ms here, and one that fell between a message's
    timestamp and its write was counted as the gateway's latency.
    """
    gc.freeze()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    times = []
    start = time.monotonic()
    cpu = time.process_time()
    infos = []
    for i, (topic, payload, retain) in enumerate(items):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        times.append(time.monotonic())
        infos.append(client.publish(topic, payload, qos=1, retain=retain))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()
    out.put((start, times, (time.process_time() - cpu) / max(1, len(items))))


def run_publisher(
    port: int, items: list[tuple[str, bytes, bool]], rate: float | None = None
) -> tuple[mp.Process, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=publish_proc, args=(port, items, queue, rate))
    proc.start()
    return proc, queue


def sealed_stream(n: int, topics: Topics) -> tuple[list, list]:
    a, b, cid, setup = conversation(topics)
    stream = []
    for i in range(n):
        who = a if i % 2 else b
        stream.append((topics.msg(cid), who.seal(cid, TextMessage(sent_at=i, text=TEXT)), False))
    return setup, stream


# -- broker baseline and archive -------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """Messages a second, and CPU seconds a message: the publisher's and this process's
    (the bare subscriber's or the archiver's, all threads) over the stream."""

    per_s: float
    publisher_cpu: float
    own_cpu: float


def broker_rate(port: int, prefix: str, stream: list) -> Rate:
    topics = Topics(prefix)
    done = threading.Event()
    got = [0, 0.0]

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        got[0] += 1
        if got[0] == len(stream):
            got[1] = time.monotonic()
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bare-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(topics.all_msgs(), qos=1)
    sub.loop_start()
    time.sleep(0.5)
    cpu = time.process_time()
    proc, queue = run_publisher(port, stream)
    done.wait(300)
    cpu = time.process_time() - cpu
    start, _, publisher_cpu = queue.get(timeout=300)
    proc.join(60)
    sub.loop_stop()
    sub.disconnect()
    return Rate(len(stream) / (got[1] - start), publisher_cpu, cpu / len(stream))


async def archive_rate(
    port: int, prefix: str, database_url: str, setup: list, stream: list
) -> Rate:
    settings = GatewaySettings(
        mqtt_url=f"mqtt://127.0.0.1:{port}",
        topic_prefix=prefix,
        database_url=database_url,
        mqtt_client_id=f"arch-{prefix}",
        **FAST,
    )
    store = open_store(database_url)
    await store.migrate()
    archiver = Archiver(settings, store, GatewayMetrics())
    task = asyncio.create_task(archiver.run())
    try:
        await asyncio.wait_for(archiver.connected.wait(), 30)
        proc, queue = run_publisher(port, setup)
        await asyncio.to_thread(queue.get, True, 60)
        proc.join(30)
        cid = next(
            Topics(prefix).parse(t).cid for t, _, _ in setup if t.endswith(("/roster", "/propose"))
        )
        end = time.monotonic() + 30
        while await store.roster(cid or "", 0) is None:
            if time.monotonic() > end:
                raise RuntimeError("the roster was not archived")
            await asyncio.sleep(0.05)
        cpu = time.process_time()
        proc, queue = run_publisher(port, stream)
        # Watched from now, not from the publisher's report: that comes only after its
        # paho loop stopped, which can take up to paho's 1 s select timeout, and was
        # once counted as archive time (a third of the rate, in half the runs).
        end = time.monotonic() + 600
        while archiver.counters["archived"] < len(stream) and time.monotonic() < end:
            await asyncio.sleep(0.002)
        finished = time.monotonic()
        cpu = time.process_time() - cpu
        start, _, publisher_cpu = await asyncio.to_thread(queue.get, True, 300)
        proc.join(60)
        if archiver.counters["archived"] < len(stream):
            raise RuntimeError(f"archived only {archiver.counters['archived']}")
        return Rate(len(stream) / (finished - start), publisher_cpu, cpu / len(stream))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        archiver.close()
        await store.close()


async def archive_rounds(
    port: int, prefix: str, work: Path, setup: list, stream: list, rounds: int
) -> dict[str, Any]:
    """Bare subscriber and SQLite archive, alternating over ``rounds`` rounds.

    Each round runs the baseline and then the archive right after it, each under a
    fresh topic prefix (a new persistent session and an empty store), so a ratio
    compares runs under about the same load; the median of the per-round ratios is
    less at the mercy of one busy moment of the shared machine than a single pair.

    ``archive_cpu_us_per_msg`` says what bounds the ratio on a machine the publisher,
    the broker and the consumer keep busy: the rates follow the CPU each message costs
    all three, and the archive verifies a signature (≈ 41 µs) the bare subscriber skips.
    """
    brokers: list[Rate] = []
    archives: list[Rate] = []
    for r in range(rounds):
        gc.freeze()  # the benchmark's own data (streams of envelopes) is not the gateway's
        brokers.append(broker_rate(port, f"{prefix}b{r}", _retopic(stream, prefix, f"b{r}")))
        archives.append(
            await archive_rate(
                port,
                f"{prefix}s{r}",
                f"sqlite:///{work / f'archive-{r}.db'}",
                _retopic(setup, prefix, f"s{r}"),
                _retopic(stream, prefix, f"s{r}"),
            )
        )
        print(
            f"round {r}: broker {brokers[-1].per_s:.0f}, sqlite {archives[-1].per_s:.0f}",
            file=sys.stderr,
        )

    def us(values: list[float]) -> float:
        return round(statistics.median(values) * 1e6, 1)

    return {
        "broker_msgs_per_s": round(statistics.median(b.per_s for b in brokers)),
        "archive_msgs_per_s_sqlite": round(statistics.median(a.per_s for a in archives)),
        "archive_ratio_sqlite": round(
            statistics.median(a.per_s / b.per_s for a, b in zip(archives, brokers, strict=True)),
            3,
        ),
        "archive_rounds": [
            [round(b.per_s), round(a.per_s)] for b, a in zip(brokers, archives, strict=True)
        ],
        "archive_cpu_us_per_msg": {
            "publisher_broker_round": us([b.publisher_cpu for b in brokers]),
            "bare_subscriber": us([b.own_cpu for b in brokers]),
            "publisher_archive_round": us([a.publisher_cpu for a in archives]),
            "archiver": us([a.own_cpu for a in archives]),
        },
    }


@contextlib.asynccontextmanager
async def postgres_database() -> Any:
    admin = url = None
    for candidate in PG_ADMIN:
        try:
            admin = await asyncpg.connect(candidate, timeout=3)
            url = candidate
            break
        except (OSError, asyncpg.PostgresError):
            continue
    if admin is None or url is None:
        yield None
        return
    name = f"fcbench_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# -- history page latency --------------------------------------------------------------


async def build_store(path: Path, rows: int, pid: str, conversations: int) -> list[str]:
    """A history of ``rows`` envelopes over ``conversations`` conversations, bulk-loaded."""
    store = open_store(f"sqlite:///{path}")
    await store.migrate()
    await store.close()
    cids = [
        base64.b32encode(uuid.uuid4().bytes).decode().rstrip("=").lower()
        for _ in range(conversations)
    ]
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    template = os.urandom(110)
    now = time.time()
    batch = 50_000
    for start in range(0, rows, batch):
        db.executemany(
            "INSERT INTO envelopes (cid, epoch, sender, sender_pid, chain, step, data, "
            "received_at, digest) VALUES (?, 0, 0, ?, 0, ?, ?, ?, x'')",  # signed: no digest
            (
                (cids[i % conversations], pid, i, i.to_bytes(8, "big") + template, now)
                for i in range(start, min(rows, start + batch))
            ),
        )
    db.executemany(
        "INSERT INTO roster_members (cid, epoch, pid) VALUES (?, 0, ?)", ((c, pid) for c in cids)
    )
    db.executemany("INSERT INTO conv_heads (cid, epoch) VALUES (?, 0)", ((c,) for c in cids))
    db.commit()
    db.close()
    return cids


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one keep-alive connection (blocking socket).

    The history figure is the server's: a full client library costs more CPU per
    request than the gateway's answer on these 2 cores, and run in the gateway's own
    event loop it added its time to every measurement. This one sends the request
    bytes and reads the answer to its Content-Length, nothing else.
    """

    def __init__(self, host: str, port: int, cookie: str) -> None:
        self.host, self.port, self.cookie = host, port, cookie
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def get(self, target: str) -> tuple[int, bytes]:
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Cookie: fc_session={self.cookie}\r\nAccept: application/json\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        while len(self.buffer) < length:
            self.buffer += self._recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, body

    def _recv(self) -> bytes:
        data = self.sock.recv(262_144)
        if not data:
            raise ConnectionError("the gateway closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def gateway_process(work: Path, port: int, prefix: str, database_url: str) -> Any:
    """``fieldchat gateway run`` as an operator starts it (its own process, uvicorn with
    the loop and HTTP parser it picks); yields its base URL."""
    gw_port = free_port()
    (work / "gw.toml").write_text(
        f'port = {gw_port}\nhost = "127.0.0.1"\nmqtt_url = "mqtt://127.0.0.1:{port}"\n'
        f'topic_prefix = "{prefix}"\ndatabase_url = "{database_url}"\n'
        f'mqtt_client_id = "bench-{uuid.uuid4().hex[:6]}"\nbatch_wait_s = 0.005\n'
        "ws_queue_max = 100000\n"
        "argon2_time_cost = 1\nargon2_memory_kib = 1024\nargon2_parallelism = 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    log = (work / "gw.log").open("wb")
    gw = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fieldchat.cli import app; app()",
            "gateway",
            "run",
            "--config",
            str(work / "gw.toml"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{gw_port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            end = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                if time.monotonic() > end or gw.poll() is not None:
                    raise RuntimeError("gateway did not start")
                await asyncio.sleep(0.2)
        yield gw, gw_port, base
    finally:
        gw.terminate()
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()
        log.close()


async def web_login(base: str, name: str, browser: Engine) -> str:
    """A web account owning ``browser``'s participant; returns the session cookie."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        creds = {"username": name, "password": "bench password"}
        await http.post("/v1/accounts", json=creds)
        await http.post("/v1/session", json=creds)
        challenge = (await http.post("/v1/me/participants/challenge", json={})).json()
        signed = claim_message(base, challenge["account"], browser.pid, challenge["challenge"])
        r = await http.post(
            "/v1/me/participants",
            json={
                "bundle": base64.b64encode(browser.identity.bundle.to_bytes()).decode(),
                "challenge": challenge["challenge"],
                "signature": base64.b64encode(browser.identity.sign(signed)).decode(),
            },
        )
        assert r.status_code == 201, r.text
        cookie = http.cookies.get("fc_session")
        assert cookie is not None
        return cookie


async def history_latency(port: int, rows: int, requests: int) -> tuple[float, float]:
    """p99 of a 50-envelope page through HTTP (a gateway process on loopback, one
    keep-alive connection, the session cookie, membership checked), and of the store
    call alone (the same SQLite file opened here)."""
    work = Path(tempfile.mkdtemp(prefix="fc-hist-"))
    try:
        browser = Engine(Identity.generate())
        cids = await build_store(work / "history.db", rows, browser.pid, 1000)
        url = f"sqlite:///{work / 'history.db'}"
        prefix = f"h{uuid.uuid4().hex[:6]}/v1"
        async with gateway_process(work, port, prefix, url) as (_, gw_port, base):
            cookie = await web_login(base, "bench", browser)
            store = open_store(url)
            client = KeepAliveClient("127.0.0.1", gw_port, cookie)
            try:
                rng = random.Random(5)
                api, direct = [], []
                for i in range(requests):
                    cid = rng.choice(cids)
                    before = None if i % 2 else rows // 2
                    query = "limit=50" if before is None else f"limit=50&before={before}"
                    t0 = time.perf_counter()
                    status, body = client.get(f"/v1/conversations/{cid}/envelopes?{query}")
                    api.append((time.perf_counter() - t0) * 1000)
                    assert status == 200, body[:200]
                    assert json.loads(body)["items"], "an empty page"
                    t0 = time.perf_counter()
                    await store.history(cid, before=before, limit=50)
                    direct.append((time.perf_counter() - t0) * 1000)
            finally:
                client.close()
                await store.close()
        return p99(api), p99(direct)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- WebSocket fan-out -----------------------------------------------------------------


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_ENVELOPE_FRAME = b'{"op":"envelope"'


class _LightWebSocket(asyncio.Protocol):
    """A minimal RFC 6455 client for the fan-out benchmark: handshake without
    extensions, unmasked server frames parsed in place, pings answered, close echoed.

    The benchmark's 1,000 clients share the gateway's 2 cores; a full client library
    (a task per ``recv``, a frame object per message) costs more CPU per frame than the
    gateway's send, so it measured the clients, not the fan-out. Every frame is still
    parsed and every envelope frame is recorded with the time its bytes arrived.
    """

    def __init__(
        self,
        request: bytes,
        accept: bytes,
        seen: dict[bytes, list[float]],
        caught_up: asyncio.Future[None],
        expected: int,
    ) -> None:
        self.request, self.accept, self.seen = request, accept, seen
        self.caught_up, self.expected = caught_up, expected
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments = bytearray()
        self.count = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.caught_up, self.done):
            if not future.done():
                future.set_exception(ConnectionError(f"socket closed: {exc}"))

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # client frames are masked (RFC 6455 §5.3)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None
        assert len(payload) < 126
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buffer
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            if not head.startswith(b"http/1.1 101") or self.accept.lower() not in head:
                raise RuntimeError(f"WebSocket handshake refused: {head[:80]!r}")
            del buf[: end + 4]
            self.upgraded = True
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            size, at = b1 & 0x7F, pos + 2
            if size == 126:
                if len(buf) - at < 2:
                    break
                size, at = int.from_bytes(buf[at : at + 2], "big"), at + 2
            elif size == 127:
                if len(buf) - at < 8:
                    break
                size, at = int.from_bytes(buf[at : at + 8], "big"), at + 8
            if b1 & 0x80 or len(buf) - at < size:
                if b1 & 0x80:
                    raise RuntimeError("the server masked a frame")
                break
            payload = bytes(buf[at : at + size])
            pos = at + size
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0x8:
                self._send(0x8, payload[:2])
                continue
            if opcode in (0x1, 0x0):
                if not b0 & 0x80:
                    self.fragments += payload
                    continue
                if self.fragments:
                    payload, self.fragments = bytes(self.fragments) + payload, bytearray()
                self._message(payload, now)
        del buf[:pos]

    def _message(self, text: bytes, now: float) -> None:
        if text.startswith(b"["):  # several frames in one (``batch=1``, see gateway._ws)
            for frame in json.loads(text):
                if frame["op"] == "envelope":
                    self._envelope(frame["data"][-24:].encode(), now)
                elif frame["op"] == "caught_up" and not self.caught_up.done():
                    self.caught_up.set_result(None)
        elif text.startswith(_ENVELOPE_FRAME):
            # the tail of the base64 signature identifies the envelope
            self._envelope(text[-26:-2], now)
        elif b'"caught_up"' in text and not self.caught_up.done():
            self.caught_up.set_result(None)

    def _envelope(self, key: bytes, now: float) -> None:
        self.seen.setdefault(key, []).append(now)
        self.count += 1
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)


def ws_clients_proc(
    host: str, port: int, cookie: str, n: int, expected: int, deadline: float, ready: Any, out: Any
) -> None:
    """Child process: ``n`` sockets; record the receive time of every envelope frame
    (the imported modules frozen out of the cyclic collector, as in the publisher)."""
    gc.freeze()

    async def main() -> dict[bytes, list[float]]:
        loop = asyncio.get_running_loop()
        seen: dict[bytes, list[float]] = {}
        clients = []
        for _ in range(n):
            key = base64.b64encode(os.urandom(16))
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            request = (
                f"GET /ws?batch=1 HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                f"Sec-WebSocket-Version: 13\r\nCookie: fc_session={cookie}\r\n\r\n"
            ).encode()
            caught_up: asyncio.Future[None] = loop.create_future()
            client = _LightWebSocket(request, accept, seen, caught_up, expected)
            await loop.create_connection(lambda c=client: c, host, port)
            await asyncio.wait_for(caught_up, 60)
            clients.append(client)
        ready.set()
        await asyncio.wait([c.done for c in clients], timeout=max(0.1, deadline - time.time()))
        for c in clients:
            if c.transport is not None:
                c.transport.close()
        return seen

    out.put(asyncio.run(main()))


async def ws_fanout(port: int, clients: int, seconds: int, rate: int) -> dict[str, float]:
    """Fan-out latency, losses, and the CPU (in cores) the gateway and the clients
    used while the stream ran: on a shared 2-core machine that says who was short."""
    work = Path(tempfile.mkdtemp(prefix="fc-ws-"))
    prefix = f"w{uuid.uuid4().hex[:6]}/v1"
    topics = Topics(prefix)
    ctx = mp.get_context("spawn")
    url = f"sqlite:///{work / 'gw.db'}"
    try:
        async with gateway_process(work, port, prefix, url) as (gw, gw_port, base):
            device, web, cid, setup = conversation(topics)  # the browser has ML-KEM-768 too
            cookie = await web_login(base, "fanout", web)
            proc, queue = run_publisher(port, setup)
            await asyncio.to_thread(queue.get, True, 60)
            proc.join(30)
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                http.cookies.set("fc_session", cookie)
                end = time.monotonic() + 60
                while not (await http.get("/v1/conversations")).json()["conversations"]:
                    if time.monotonic() > end:
                        raise RuntimeError("the conversation was not archived")
                    await asyncio.sleep(0.1)
            total = seconds * rate
            stream = [
                (topics.msg(cid), device.seal(cid, TextMessage(sent_at=i, text=TEXT)), False)
                for i in range(total)
            ]
            ready, results = ctx.Event(), ctx.Queue()
            deadline = time.time() + 180 + seconds
            clients_proc = ctx.Process(
                target=ws_clients_proc,
                args=("127.0.0.1", gw_port, cookie, clients, total, deadline, ready, results),
            )
            clients_proc.start()
            if not await asyncio.to_thread(ready.wait, 180):
                raise RuntimeError("the WebSocket clients did not connect")
            assert clients_proc.pid is not None
            cpu0 = (cpu_seconds(gw.pid), cpu_seconds(clients_proc.pid), time.monotonic())
            proc, queue = run_publisher(port, stream, rate=rate)
            _, sent_at, _ = await asyncio.to_thread(queue.get, True, seconds + 120)
            proc.join(30)
            await asyncio.sleep(1.0)  # the last envelopes' fan-out
            cpu1 = (cpu_seconds(gw.pid), cpu_seconds(clients_proc.pid), time.monotonic())
            seen = await asyncio.to_thread(results.get, True, 300)
            clients_proc.join(30)
        latencies = []
        for (_, payload, _), t_pub in zip(stream, sent_at, strict=True):
            key = base64.b64encode(payload)[-24:]
            latencies += [(t - t_pub) * 1000 for t in seen.get(key, [])]
        wall = cpu1[2] - cpu0[2]
        return {
            "ws_fanout_p99_ms": round(p99(latencies), 1) if latencies else float("nan"),
            "ws_fanout_p50_ms": round(percentile(latencies, 0.5), 1) if latencies else float("nan"),
            "ws_lost": total * clients - len(latencies),
            "ws_gateway_cores": round((cpu1[0] - cpu0[0]) / wall, 2),
            "ws_clients_cores": round((cpu1[1] - cpu0[1]) / wall, 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- main ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    mosq, port = start_mosquitto(work)
    result: dict[str, Any] = {
        "messages": args.messages,
        "store_rows": args.store_rows,
        "ws_clients": args.ws_clients,
        "ws_seconds": args.ws_seconds,
    }
    try:
        prefix = f"b{uuid.uuid4().hex[:6]}/v1"
        setup, stream = sealed_stream(args.messages, Topics(prefix))
        result.update(await archive_rounds(port, prefix, work, setup, stream, args.rounds))
        if not args.skip_postgres:
            async with postgres_database() as pg:
                if pg is not None:
                    pg_rate = await archive_rate(
                        port,
                        prefix + "p",
                        pg,
                        _retopic(setup, prefix, "p"),
                        _retopic(stream, prefix, "p"),
                    )
                    result["archive_msgs_per_s_postgres"] = round(pg_rate.per_s)
                    print("postgres", result["archive_msgs_per_s_postgres"], file=sys.stderr)
        api, direct = await history_latency(port, args.store_rows, args.history_requests)
        result["history_page_p99_ms"] = round(api, 2)
        result["history_page_store_p99_ms"] = round(direct, 2)
        print("history", api, direct, file=sys.stderr)
        if args.ws_clients:
            result.update(await ws_fanout(port, args.ws_clients, args.ws_seconds, args.ws_rate))
    finally:
        mosq.terminate()
        mosq.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return result


def _retopic(items: list, prefix: str, suffix: str) -> list:
    """The same envelopes under another prefix (a fresh persistent session per run)."""
    return [(t.replace(prefix, prefix + suffix, 1), p, r) for t, p, r in items]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--store-rows", type=int, default=1_000_000)
    parser.add_argument("--history-requests", type=int, default=2_000)
    parser.add_argument("--ws-clients", type=int, default=1_000)
    parser.add_argument("--ws-seconds", type=int, default=30)
    parser.add_argument("--ws-rate", type=int, default=20)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="broker/archive round pairs")
    # The archiver runs on the event loop ``fieldchat gateway run`` gets from uvicorn:
    # uvloop where it is installed (a dependency of the gateway).
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(json.dumps(runner.run(main(parser.parse_args()))))
