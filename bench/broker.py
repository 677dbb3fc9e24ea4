"""Broker throughput: QoS 1, 256-byte payloads, one publisher and one subscriber process.

Runs the same load against fieldchat's broker, stock aMQTT 0.12.1 (anonymous, no
plugins beyond authentication: its fastest configuration) and Mosquitto (the
generated configuration), each in its own process, over MQTT 3.1.1, then ours and
Mosquitto again over MQTT 5 with topic aliases on (the publisher sends the topic once,
then its alias; the subscriber accepts 10 aliases, so the broker does the same), and
prints on its last line:

    {"msgs_per_s_ours": …, "msgs_per_s_stock_amqtt": …, "msgs_per_s_mosquitto": …,
     "ratio_ours_vs_stock": …, "ratio_ours_vs_mosquitto": …, "msgs_per_s_ours_v5": …,
     "msgs_per_s_mosquitto_v5": …, "ratio_ours_vs_mosquitto_v5": …, …}

The clients are raw asyncio MQTT clients (packets from the codec, schemas.mqtt) with a
window of 100 unacknowledged PUBLISHes, so the clients cost less than the brokers.
Rate = messages / (last received - first sent), measured by the subscriber.
Every run is bounded: --count messages and --timeout seconds.

    .venv/bin/python bench/broker.py [--count 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named broker.py: put the project root first so `broker` is the package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fieldchat.broker._mosquitto import write_mosquitto_config
from fieldchat.broker._store import Store
from fieldchat.broker.testing import participant
from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import MalformedPacket
from fieldchat.schemas.topics import Topics

PAYLOAD = 256
WINDOW = 100
T = Topics()
ROOT = Path(__file__).resolve().parent.parent


async def _read(reader: asyncio.StreamReader, decoder: mqtt.Decoder) -> list[mqtt.Packet]:
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed by the broker")
        packets = decoder.feed(data)
        if packets:
            return packets


async def _open(
    args: argparse.Namespace, *, clean: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, mqtt.Decoder, list[mqtt.Packet]]:
    """Connect at ``args.level``; return the stream, its decoder and what followed the
    CONNACK. MQTT 5 clients accept topic aliases (Topic Alias Maximum 10)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    properties = mqtt.NO_PROPERTIES
    if args.level == mqtt.ProtocolLevel.V5:
        properties = mqtt.Properties(
            topic_alias_maximum=10, session_expiry_interval=0 if clean else 3600
        )
    password = None if args.password is None else args.password.encode()
    connect = mqtt.Connect(
        args.client_id, clean, 60, args.user, password, None, args.level, properties
    )
    writer.write(mqtt.encode(connect))
    decoder = mqtt.Decoder(level=args.level, max_packet_size=1 << 20)
    connack, *rest = await _read(reader, decoder)
    if not isinstance(connack, mqtt.Connack) or connack.reason_code:
        raise SystemExit(f"connection refused: {connack!r}")
    alias_maximum = connack.properties.topic_alias_maximum or 0
    args.aliases = mqtt.OutboundAliases(alias_maximum if args.level == 5 else 0)
    return reader, writer, decoder, rest


async def subscriber(args: argparse.Namespace) -> None:
    reader, writer, decoder, pending = await _open(args, clean=not args.persistent)
    subscribe = mqtt.Subscribe(1, (mqtt.Subscription(args.topic, 1),))
    writer.write(mqtt.encode(subscribe, args.level))
    while not any(isinstance(p, mqtt.Suback) for p in pending):
        pending = await _read(reader, decoder)
    print("ready", flush=True)
    received, first, last = 0, 0.0, 0.0
    try:
        async with asyncio.timeout(args.timeout):
            while received < args.count:
                acks = []
                for packet in await _read(reader, decoder):
                    if not isinstance(packet, mqtt.Publish):
                        continue
                    if packet.payload[:8] == b"\x00" * 8 and received == 0:
                        first = struct.unpack("!d", packet.payload[8:16])[0]
                    if packet.packet_id is not None:
                        acks.append(packet.packet_id)
                    received += 1
                writer.write(mqtt.encode_pubacks(acks))
                last = time.time()
    except (TimeoutError, OSError, MalformedPacket) as exc:
        print(f"  subscriber stopped: {exc!r}", file=sys.stderr)
    writer.close()
    print(json.dumps({"received": received, "seconds": last - first if first else 0.0}), flush=True)


async def publisher(args: argparse.Namespace) -> None:
    reader, writer, decoder, _ = await _open(args)
    window = asyncio.Semaphore(WINDOW)
    acked = 0

    async def acks() -> None:
        nonlocal acked
        while acked < args.count:
            for packet in await _read(reader, decoder):
                if isinstance(packet, mqtt.Puback):
                    acked += 1
                    window.release()

    task = asyncio.create_task(acks())
    topic = args.topic.encode()
    for i in range(args.count):
        await window.acquire()
        stamp = (b"\x00" * 8 + struct.pack("!d", time.time())) if i == 0 else os.urandom(16)
        payload = stamp + b"\xa5" * (PAYLOAD - len(stamp))
        block = None  # 3.1.1: no properties
        alias, known = args.aliases.alias(args.topic)
        if args.level == mqtt.ProtocolLevel.V5:
            block = b"\x00"
            if alias is not None:
                properties = mqtt.Properties(topic_alias=alias)
                block = mqtt.encode_properties(properties, mqtt.PacketType.PUBLISH)
        name = b"" if known else topic
        writer.write(mqtt.encode_publish(name, payload, 1, i % 65535 + 1, properties=block))
        if i % WINDOW == 0:
            await writer.drain()
    await asyncio.wait_for(task, args.timeout)
    writer.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"broker exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise SystemExit("broker did not start")


def _run_load(
    port: int,
    sub: tuple[str, str | None, str | None],
    pub: tuple[str, str | None, str | None],
    topic: str,
    count: int,
    timeout: float,
    persistent: bool = False,
    level: int = 4,
) -> float:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = [
        "--level",
        str(level),
        "--port",
        str(port),
        "--topic",
        topic,
        "--count",
        str(count),
        "--timeout",
        str(timeout),
    ]

    def role(name: str, who: tuple[str, str | None, str | None]) -> list[str]:
        cid, user, password = who
        out = [*me, "--role", name, "--client-id", cid, *common]
        if user is not None:
            out += [f"--user={user}", f"--password={password or ''}"]  # may start with -
        if persistent and name == "sub":
            out.append("--persistent")
        return out

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subscriber_proc = subprocess.Popen(role("sub", sub), stdout=subprocess.PIPE, text=True, env=env)
    assert subscriber_proc.stdout is not None
    assert subscriber_proc.stdout.readline().strip() == "ready"
    publisher_proc = subprocess.Popen(role("pub", pub), env=env)
    try:
        line = subscriber_proc.stdout.readline()
        result = json.loads(line) if line.strip() else {"received": 0, "seconds": 0.0}
        publisher_proc.wait(timeout)
    finally:
        for proc in (publisher_proc, subscriber_proc):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        subscriber_proc.stdout.close()
    if result["received"] < count or result["seconds"] <= 0:
        print(f"  only {result['received']} of {count} received", file=sys.stderr)
        return 0.0
    return round(result["received"] / result["seconds"], 1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_ours(
    work: Path, count: int, timeout: float, *, persistent: bool, level: int = 4
) -> float:
    alice, bob = participant(1), participant(2)
    data = work / f"ours-{level}{'-p' if persistent else ''}"
    with Store(data / "broker.sqlite3") as store:
        creds = {alice.pid: store.enroll(alice.pid), bob.pid: store.enroll(bob.pid)}
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fieldchat.cli import app; app()",
            "broker",
            "run",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        _wait_port(port, proc)
        return _run_load(
            port,
            (alice.pid, alice.pid, creds[alice.pid]),
            (bob.pid, bob.pid, creds[bob.pid]),
            T.inbox(alice.pid),
            count,
            timeout,
            persistent=persistent,
            level=level,
        )
    finally:
        _stop(proc)


_STOCK = """
import asyncio, sys
from amqtt.broker import Broker
async def main():
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d"}},
                     "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                 {"allow_anonymous": True}}})
    await broker.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""


def bench_stock(count: int, timeout: float) -> float:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _STOCK % port], stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        return _run_load(
            port,
            ("bench-sub", None, None),
            ("bench-pub", None, None),
            "bench/topic",
            count,
            timeout,
        )
    finally:
        _stop(proc)


def bench_mosquitto(work: Path, count: int, timeout: float, level: int = 4) -> float | None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        return None
    alice, bob = participant(1), participant(2)
    port = _free_port()
    with Store(work / f"mosq-store-{level}" / "broker.sqlite3") as store:
        creds = {alice.pid: store.enroll(alice.pid), bob.pid: store.enroll(bob.pid)}
        import getpass  # noqa: PLC0415

        files = write_mosquitto_config(
            store, work / f"mosquitto-{level}", port=port, user=getpass.getuser()
        )
    proc = subprocess.Popen(
        [binary, "-c", str(files.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port, proc)
        return _run_load(
            port,
            (alice.pid, alice.pid, creds[alice.pid]),
            (bob.pid, bob.pid, creds[bob.pid]),
            T.inbox(alice.pid),
            count,
            timeout,
            level=level,
        )
    finally:
        _stop(proc)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--role", choices=["pub", "sub"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--client-id")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--topic")
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--level", type=int, choices=[4, 5], default=4)
    args = parser.parse_args()
    if args.role == "sub":
        asyncio.run(subscriber(args))
        return
    if args.role == "pub":
        asyncio.run(publisher(args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours = bench_ours(work, args.count, args.timeout, persistent=False)
        print(f"ours (clean session subscriber): {ours} msg/s", file=sys.stderr)
        ours_persistent = bench_ours(work, args.count, args.timeout, persistent=True)
        print(
            f"ours (persistent subscriber, every message committed): {ours_persistent} msg/s",
            file=sys.stderr,
        )
        ours_v5 = bench_ours(work, args.count, args.timeout, persistent=False, level=5)
        print(f"ours, MQTT 5 with topic aliases: {ours_v5} msg/s", file=sys.stderr)
        stock = bench_stock(args.count, args.timeout)
        print(f"stock aMQTT 0.12.1: {stock} msg/s", file=sys.stderr)
        mosquitto = bench_mosquitto(work, args.count, args.timeout)
        print(f"mosquitto: {mosquitto} msg/s", file=sys.stderr)
        mosquitto_v5 = bench_mosquitto(work, args.count, args.timeout, level=5)
        print(f"mosquitto, MQTT 5 with topic aliases: {mosquitto_v5} msg/s", file=sys.stderr)
    print(
        json.dumps(
            {
                "msgs_per_s_ours": ours,
                "msgs_per_s_stock_amqtt": stock,
                "msgs_per_s_mosquitto": mosquitto,
                "ratio_ours_vs_stock": _ratio(ours, stock),
                "ratio_ours_vs_mosquitto": _ratio(ours, mosquitto),
                "msgs_per_s_ours_persistent_subscriber": ours_persistent,
                "msgs_per_s_ours_v5": ours_v5,
                "msgs_per_s_mosquitto_v5": mosquitto_v5,
                "ratio_ours_vs_mosquitto_v5": _ratio(ours_v5, mosquitto_v5),
                "count": args.count,
                "payload_bytes": PAYLOAD,
                "qos": 1,
            }
        )
    )


if __name__ == "__main__":
    main()
