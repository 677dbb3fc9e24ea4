"""Gateway benchmarks (issue 5), each against its baseline in the same run.

* ``broker_msgs_per_s``: a bare paho subscriber on the local Mosquitto receiving a
  QoS 1 stream of real envelopes (from publish start to the last message).
* ``archive_msgs_per_s_sqlite`` / ``_postgres``: the archiver (verify every signature,
  batch commit, PUBACK after commit) on the same stream, from publish start to the
  last commit. ``archive_ratio_sqlite`` = archive / broker (target ≥ 1.0).
* ``history_page_p99_ms``: a 50-envelope page through the HTTP API (session cookie,
  membership check) from a 1,000,000-envelope SQLite store (target ≤ 5 ms);
  ``history_page_store_p99_ms`` is the store call alone.
* ``ws_fanout_p99_ms``: 1,000 WebSocket clients in one conversation, 20 envelopes/s
  for 30 s, publish-to-receive p99 (target ≤ 100 ms) and ``ws_lost`` (target 0).

Everything runs on 127.0.0.1 with ephemeral ports; every loop is bounded in count and
time. Usage: python bench/gateway.py [--messages N] [--store-rows N] [--ws-clients N]
[--ws-seconds S] [--skip-postgres]
"""

# ruff: noqa: ANN401 - multiprocessing queues/events and paho callbacks are untyped here

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion
from websockets.asyncio.client import connect

# This file is named like the package it measures: import the package, not itself.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from device.engine import Engine  # noqa: E402
from device.identity import Identity  # noqa: E402
from gateway import GatewaySettings, create_app, open_store  # noqa: E402
from gateway._archiver import Archiver  # noqa: E402
from gateway._metrics import Metrics  # noqa: E402
from schemas import TextMessage, Topics  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
PG_ADMIN = ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test")
FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1}
TEXT = "Pump 3 pressure 4.2 bar, valve B closed, back on site at 14:30"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\nuser root\n"
        f"log_dest file {workdir}/mosquitto.log\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, port
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


# -- participants and the stream -------------------------------------------------------


def conversation(topics: Topics, *, browser: bool = False) -> tuple[Engine, Engine, str, list]:
    """Two engines in one conversation; returns the publications to put on MQTT."""
    a = Engine(Identity.generate(), topics=topics)
    b = Engine(Identity.generate(post_quantum=not browser), topics=topics)
    a.learn_bundle(b.identity.bundle.to_bytes())
    b.learn_bundle(a.identity.bundle.to_bytes())
    cid, pubs = a.create_conversation([b.pid])
    out = [a.bundle_publication(), b.bundle_publication()]
    for pub in pubs:
        out.append(pub)
        if pub.topic.endswith("/roster"):
            for back in b.handle_roster(pub.payload):
                out.append(back)
                a.handle_grant(back.payload)
        elif pub.topic == topics.inbox(b.pid):
            b.handle_grant(pub.payload)
    return a, b, cid, [(p.topic, p.payload, p.retain) for p in out]


def publish_proc(port: int, items: list[tuple[str, bytes, bool]], out: Any,
                 rate: float | None = None) -> None:
    """Child process: publish QoS 1 as fast as allowed (or at ``rate``/s); report times."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    times = []
    start = time.monotonic()
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
    out.put((start, times))


def run_publisher(port: int, items: list[tuple[str, bytes, bool]],
                  rate: float | None = None) -> tuple[mp.Process, Any]:
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


def broker_rate(port: int, prefix: str, stream: list) -> float:
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
    proc, queue = run_publisher(port, stream)
    start, _ = queue.get(timeout=300)
    proc.join(60)
    done.wait(300)
    sub.loop_stop()
    sub.disconnect()
    return len(stream) / (got[1] - start)


async def archive_rate(port: int, prefix: str, database_url: str, setup: list,
                       stream: list) -> float:
    settings = GatewaySettings(mqtt_url=f"mqtt://127.0.0.1:{port}", topic_prefix=prefix,
                               database_url=database_url, mqtt_client_id=f"arch-{prefix}",
                               **FAST)
    store = open_store(database_url)
    await store.migrate()
    archiver = Archiver(settings, store, Metrics())
    task = asyncio.create_task(archiver.run())
    try:
        await asyncio.wait_for(archiver.connected.wait(), 30)
        proc, queue = run_publisher(port, setup)
        await asyncio.to_thread(queue.get, True, 60)
        proc.join(30)
        cid = next(Topics(prefix).parse(t).cid for t, _, _ in setup if t.endswith("/roster"))
        end = time.monotonic() + 30
        while await store.roster(cid or "", 0) is None:
            if time.monotonic() > end:
                raise RuntimeError("the roster was not archived")
            await asyncio.sleep(0.05)
        proc, queue = run_publisher(port, stream)
        start, _ = await asyncio.to_thread(queue.get, True, 300)
        end = time.monotonic() + 600
        while archiver.counters["archived"] < len(stream) and time.monotonic() < end:
            await asyncio.sleep(0.005)
        finished = time.monotonic()
        proc.join(60)
        if archiver.counters["archived"] < len(stream):
            raise RuntimeError(f"archived only {archiver.counters['archived']}")
        return len(stream) / (finished - start)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        archiver.close()
        await store.close()


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
    cids = [base64.b32encode(uuid.uuid4().bytes).decode().rstrip("=").lower()
            for _ in range(conversations)]
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    template = os.urandom(110)
    now = time.time()
    batch = 50_000
    for start in range(0, rows, batch):
        db.executemany(
            "INSERT INTO envelopes (cid, epoch, sender, sender_pid, chain, step, data, "
            "received_at) VALUES (?, 0, 0, ?, 0, ?, ?, ?)",
            ((cids[i % conversations], pid, i, i.to_bytes(8, "big") + template, now)
             for i in range(start, min(rows, start + batch))),
        )
    db.executemany("INSERT INTO roster_members (cid, epoch, pid) VALUES (?, 0, ?)",
                   ((c, pid) for c in cids))
    db.executemany("INSERT INTO conv_heads (cid, epoch) VALUES (?, 0)", ((c,) for c in cids))
    db.commit()
    db.close()
    return cids


async def history_latency(port: int, rows: int, requests: int) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="fc-hist-"))
    try:
        browser = Engine(Identity.generate(post_quantum=False))
        cids = await build_store(work / "history.db", rows, browser.pid, 1000)
        settings = GatewaySettings(mqtt_url=f"mqtt://127.0.0.1:{port}",
                                   database_url=f"sqlite:///{work / 'history.db'}",
                                   topic_prefix=f"h{uuid.uuid4().hex[:6]}/v1", **FAST)
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                               log_level="warning"))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                creds = {"username": "bench", "password": "bench password"}
                await http.post("/v1/accounts", json=creds)
                await http.post("/v1/session", json=creds)
                await http.post("/v1/me/participants", json={
                    "bundle": base64.b64encode(browser.identity.bundle.to_bytes()).decode()})
                rng = random.Random(5)
                api, direct = [], []
                store = app.state.gateway.store
                for i in range(requests):
                    cid = rng.choice(cids)
                    params = {"limit": 50} if i % 2 else {"limit": 50, "before": rows // 2}
                    t0 = time.perf_counter()
                    r = await http.get(f"/v1/conversations/{cid}/envelopes", params=params)
                    api.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200, r.text
                    t0 = time.perf_counter()
                    await store.history(cid, before=params.get("before"), limit=50)
                    direct.append((time.perf_counter() - t0) * 1000)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)
        return p99(api), p99(direct)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- WebSocket fan-out -----------------------------------------------------------------


def ws_clients_proc(url: str, cookie: str, n: int, expected: int, deadline: float,
                    ready: Any, out: Any) -> None:
    """Child process: ``n`` sockets; record the receive time of every envelope frame."""

    async def main() -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {}
        sockets = []
        for _ in range(n):
            ws = await connect(url, additional_headers={"Cookie": f"fc_session={cookie}"},
                               max_queue=None, open_timeout=60)
            sockets.append(ws)
            while '"caught_up"' not in (await ws.recv()):
                pass
        ready.set()

        async def reader(ws: Any) -> None:
            count = 0
            with contextlib.suppress(Exception):
                while count < expected:
                    text = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.time()))
                    now = time.monotonic()
                    if text.startswith('{"op":"envelope"'):
                        key = text[-26:-2]  # the tail of the base64 signature: unique
                        seen.setdefault(key, []).append(now)
                        count += 1

        await asyncio.gather(*(reader(ws) for ws in sockets))
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        return seen

    out.put(asyncio.run(main()))


async def ws_fanout(port: int, clients: int, seconds: int, rate: int) -> tuple[float, int]:
    work = Path(tempfile.mkdtemp(prefix="fc-ws-"))
    prefix = f"w{uuid.uuid4().hex[:6]}/v1"
    topics = Topics(prefix)
    gw_port = free_port()
    (work / "gw.toml").write_text(
        f'port = {gw_port}\nhost = "127.0.0.1"\nmqtt_url = "mqtt://127.0.0.1:{port}"\n'
        f'topic_prefix = "{prefix}"\ndatabase_url = "sqlite:///{work / "gw.db"}"\n'
        f'mqtt_client_id = "ws-bench"\nbatch_wait_s = 0.005\nws_queue_max = 100000\n'
        "argon2_time_cost = 1\nargon2_memory_kib = 1024\nargon2_parallelism = 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    log = (work / "gw.log").open("wb")
    gw = subprocess.Popen([sys.executable, "-c", "from fieldchat.cli import app; app()",
                           "gateway", "run", "--config", str(work / "gw.toml")],
                          stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{gw_port}"
    ctx = mp.get_context("spawn")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            end = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                if time.monotonic() > end:
                    raise RuntimeError("gateway did not start")
                await asyncio.sleep(0.2)
            device, web, cid, setup = conversation(topics, browser=True)
            creds = {"username": "fanout", "password": "bench password"}
            await http.post("/v1/accounts", json=creds)
            await http.post("/v1/session", json=creds)
            r = await http.post("/v1/me/participants", json={
                "bundle": base64.b64encode(web.identity.bundle.to_bytes()).decode()})
            assert r.status_code == 201, r.text
            cookie = http.cookies.get("fc_session")
            proc, queue = run_publisher(port, setup)
            await asyncio.to_thread(queue.get, True, 60)
            proc.join(30)
            while not (await http.get("/v1/conversations")).json()["conversations"]:
                await asyncio.sleep(0.1)
        total = seconds * rate
        stream = [(topics.msg(cid), device.seal(cid, TextMessage(sent_at=i, text=TEXT)), False)
                  for i in range(total)]
        ready, results = ctx.Event(), ctx.Queue()
        deadline = time.time() + 180 + seconds
        clients_proc = ctx.Process(target=ws_clients_proc, args=(
            f"ws://127.0.0.1:{gw_port}/ws", cookie, clients, total, deadline, ready, results))
        clients_proc.start()
        if not await asyncio.to_thread(ready.wait, 180):
            raise RuntimeError("the WebSocket clients did not connect")
        proc, queue = run_publisher(port, stream, rate=rate)
        _, sent_at = await asyncio.to_thread(queue.get, True, seconds + 120)
        proc.join(30)
        seen = await asyncio.to_thread(results.get, True, 300)
        clients_proc.join(30)
        latencies = []
        for (_, payload, _), t_pub in zip(stream, sent_at, strict=True):
            key = base64.b64encode(payload).decode()[-24:]
            latencies += [(t - t_pub) * 1000 for t in seen.get(key, [])]
        lost = total * clients - len(latencies)
        return (p99(latencies) if latencies else float("nan")), lost
    finally:
        gw.terminate()
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


# -- main ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    mosq, port = start_mosquitto(work)
    result: dict[str, Any] = {"messages": args.messages, "store_rows": args.store_rows,
                              "ws_clients": args.ws_clients, "ws_seconds": args.ws_seconds}
    try:
        prefix = f"b{uuid.uuid4().hex[:6]}/v1"
        setup, stream = sealed_stream(args.messages, Topics(prefix))
        result["broker_msgs_per_s"] = round(broker_rate(port, prefix, stream))
        print("broker", result["broker_msgs_per_s"], file=sys.stderr)
        sqlite_url = f"sqlite:///{work / 'archive.db'}"
        result["archive_msgs_per_s_sqlite"] = round(
            await archive_rate(port, prefix + "s", sqlite_url, _retopic(setup, prefix, "s"),
                               _retopic(stream, prefix, "s")))
        result["archive_ratio_sqlite"] = round(
            result["archive_msgs_per_s_sqlite"] / result["broker_msgs_per_s"], 3)
        print("sqlite", result["archive_msgs_per_s_sqlite"], file=sys.stderr)
        if not args.skip_postgres:
            async with postgres_database() as pg:
                if pg is not None:
                    result["archive_msgs_per_s_postgres"] = round(await archive_rate(
                        port, prefix + "p", pg, _retopic(setup, prefix, "p"),
                        _retopic(stream, prefix, "p")))
                    print("postgres", result["archive_msgs_per_s_postgres"], file=sys.stderr)
        api, direct = await history_latency(port, args.store_rows, args.history_requests)
        result["history_page_p99_ms"] = round(api, 2)
        result["history_page_store_p99_ms"] = round(direct, 2)
        print("history", api, direct, file=sys.stderr)
        if args.ws_clients:
            fan, lost = await ws_fanout(port, args.ws_clients, args.ws_seconds, args.ws_rate)
            result["ws_fanout_p99_ms"] = round(fan, 1)
            result["ws_lost"] = lost
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
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
