"""Device benchmark: fieldchat devices vs bare paho over one local Mosquitto.

Run: ``.venv/bin/python bench/device.py`` (needs ``mosquitto`` on PATH or in
/usr/sbin). The last line is a JSON object with ``e2e_msgs_per_s``,
``raw_paho_msgs_per_s``, ``throughput_ratio``, ``added_latency_p50_ms``,
``added_latency_p99_ms``, ``rss_mb_device``, ``rss_mb_bare_paho`` and
``wire_bytes_per_message`` (per protocol and policy), and ``cpu_us_per_msg`` (CPU time
per message of each throughput process, all its threads). Every loop is bounded in count
and time. Throughput runs sender and receiver in separate processes (as the facts in
issue 4 were measured), alternating with bare paho over rounds; latency runs both ends
in one process so they share a clock, interleaved with bare paho (see ``_latency``).
``latency_ms`` gives the absolute percentiles behind the added ones; on MQTT 3.1.1
``*_own_echo`` is the part of the wire bytes spent on our own messages coming back
(3.1.1 has no no-local option; MQTT 5 connections subscribe with it), and ``*_backlog``
the bytes per message of 128 sent at once, as an outbox drains after an outage (frames),
own echo excluded.

``gap_repair_ms`` is how long a message a broker dropped takes to reach the screen,
in order, once a later one reveals the gap (MISSING receipts, PROTOCOL.md §4.1), on
loopback and with 250 ms each way on every link; ``tail_bytes_after_reconnect`` the
bytes of the tail round after a reconnect that missed nothing (target < 1 KB), and
``archive_check_bytes_per_message`` what confirming own envelopes with the archive
costs per envelope, by how many one check names (both through a gateway process).

``wire_bytes_embedded_low_bandwidth`` is ``wire_bytes_per_message``'s
``embedded_mqtt5_low_bandwidth``: a low-bandwidth device on the embedded broker (what
``fieldchat up`` runs), MQTT 5 as ``protocol="auto"`` picks it, with aliases and No
Local, so the own echo it includes is none (target ≤ 110; 282.4 on 3.1.1).

``bench/device.py latency``, ``throughput``, ``wire``, ``repair`` or ``reconcile`` runs
one part alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# This file is named after what it measures, which shadows the ``device`` package
# when run as a script: take its own folder off the import path first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from fieldchat.broker import BrokerConfig, BrokerThread
from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions, LinkOptions, low_bandwidth_policy
from fieldchat.device.events import Event, MessageReceived
from fieldchat.device.history import GatewayHistory
from fieldchat.device.reconcile import reconcile
from fieldchat.schemas import Policy
from fieldchat.schemas.envelope import EnvelopeKind, read_header
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.frame import split
from tests.device._verifier import RosterVerifier

TEXT = "field report: pump 3 pressure nominal, valve 7 replaced, ok"  # 60 chars
N_THROUGHPUT = 3_000
THROUGHPUT_ROUNDS = 3
N_LATENCY = 200  # per stream and round, at 50 messages/s each: 4 s
LATENCY_ROUNDS = 4
LATENCY_WARMUP = 10
N_WIRE = 400
N_BACKLOG = 128  # sent at once: two full frames (PROTOCOL.md §3.4)
REPAIR_ROUNDS = 8
N_TAIL = 100  # messages exchanged live before the reconnect whose tail is measured
LINK = LinkOptions(receipt_interval_s=1.0, backoff_min_s=0.1, backoff_max_s=1.0)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Broker:
    """A local Mosquitto. Mosquitto cannot check rosters, so members propose them and a
    verifier retains those that chain (PROTOCOL.md §5.2): ``verify_rosters`` runs the
    one the device tests use (tests/device/_verifier.py) in this process; without one
    (and no gateway) nobody joins a conversation and the receivers get nothing."""

    def __init__(
        self,
        workdir: Path,
        *,
        queued: int = 100_000,
        inflight: int = 100,
        verify_rosters: bool = True,
    ) -> None:
        self.port = _port()
        self.verifier: RosterVerifier | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        # set_tcp_nodelay as `fieldchat broker mosquitto-config` writes it (without it,
        # Nagle's algorithm delays 1 PUBLISH in 100 by 25-30 ms: broker/_mosquitto.py).
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages {queued}\nmax_inflight_messages {inflight}\n"
            "set_tcp_nodelay true\n" + ("user root\n" if os.getuid() == 0 else "")
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.02)
            else:
                if verify_rosters:
                    self.verifier = RosterVerifier(self.port, "verifier", "").start()
                return
        raise RuntimeError("mosquitto did not start")

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.stop()
        self.proc.terminate()
        self.proc.wait(10)


class Embedded:
    """The embedded broker (``fieldchat broker run``'s engine) on a thread of this
    process, MQTT 5 and 3.1.1; it verifies proposed rosters itself (no gateway)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.thread = BrokerThread(BrokerConfig(data_dir=workdir, port=0))
        self.thread.start()
        self.port = self.thread.port

    def credential(self, path: Path) -> SecretStr:
        """Enroll the device whose state file is ``path``; its credential."""
        probe = Device(path)
        pid = probe.pid
        probe.close()
        return SecretStr(self.thread.enroll(pid))

    def close(self) -> None:
        self.thread.stop()


class _Relay:
    """A TCP relay on 127.0.0.1 to ``target``; subclasses move the bytes (``_relay``)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._relay(client, socket.create_connection(("127.0.0.1", self.target)))

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class Proxy(_Relay):
    """A TCP relay counting the bytes a client exchanges with the broker.

    With ``echo``, it also counts the bytes of our own texts the broker sends back
    to us on MQTT 3.1.1 (which has no no-local subscription option): each such
    PUBLISH (parsed per MQTT 3.1.1 §3.3) plus the 4-byte PUBACK we answer it with.
    """

    def __init__(self, target: int, *, echo: bool = False) -> None:
        super().__init__(target)
        self.bytes = 0
        self.echo_bytes = 0
        self._echo = echo
        self._lock = threading.Lock()
        self.start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        for a, b, down in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(
                target=self._pipe, args=(a, b, down and self._echo), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, parse: bool) -> None:
        buf = b""
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.bytes += len(data)
                dst.sendall(data)
                if parse:
                    buf = self._scan(buf + data)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.close()

    def _scan(self, buf: bytes) -> bytes:
        """Count echoed texts among the complete packets in ``buf``; the rest."""
        while len(buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:  # remaining length: at most 4 bytes (MQTT 3.1.1 §2.2.3)
                if i >= len(buf) or i > 4:
                    return buf
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            if len(buf) < i + length:
                return buf
            packet, buf = buf[: i + length], buf[i + length :]
            if packet[0] >> 4 != 3:  # not a PUBLISH
                continue
            topic_len = int.from_bytes(packet[i : i + 2], "big")
            topic = packet[i + 2 : i + 2 + topic_len]
            start = i + 2 + topic_len + (2 if (packet[0] >> 1) & 3 else 0)
            with contextlib.suppress(FieldchatError):
                first = split(packet[start:])[0]  # a frame's kind is its envelopes' kind
                if topic.endswith(b"/msg") and read_header(first).kind is EnvelopeKind.TEXT:
                    with self._lock:
                        self.echo_bytes += len(packet) + 4
        return buf


_RUN_GATEWAY = "from fieldchat.cli import app; app()"


class Gateway:
    """``fieldchat gateway run`` on the bench's Mosquitto: it retains the rosters
    members propose (PROTOCOL.md §5.2; Mosquitto cannot check them) and archives."""

    def __init__(self, workdir: Path, mqtt_port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = _port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = workdir / "gateway.toml"
        config.write_text(
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'database_url = "sqlite:///{workdir}/gateway.db"\n'
            f'mqtt_url = "mqtt://127.0.0.1:{mqtt_port}"\n'
            f'mqtt_client_id = "bench-gw-{os.urandom(3).hex()}"\n'
            "argon2_time_cost = 1\nargon2_memory_kib = 64\nargon2_parallelism = 1\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
        self.log = (workdir / "gateway.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_GATEWAY, "gateway", "run", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: see {workdir}/gateway.log")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("the gateway did not become healthy")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


class DelayProxy(_Relay):
    """A TCP relay that delivers every byte ``delay`` seconds after it arrived, in each
    direction: a link with a round trip of twice that (bandwidth unlimited)."""

    def __init__(self, target: int, delay: float) -> None:
        super().__init__(target)
        self.delay = delay
        self.start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        for a, b in ((client, upstream), (upstream, client)):
            chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
            threading.Thread(target=self._read, args=(a, chunks), daemon=True).start()
            threading.Thread(target=self._write, args=(b, chunks), daemon=True).start()

    def _read(self, src: socket.socket, chunks: queue.Queue[tuple[float, bytes] | None]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                chunks.put((time.monotonic() + self.delay, data))
        chunks.put(None)

    @staticmethod
    def _write(dst: socket.socket, chunks: queue.Queue[tuple[float, bytes] | None]) -> None:
        try:
            while (item := chunks.get()) is not None:
                time.sleep(max(0.0, item[0] - time.monotonic()))
                dst.sendall(item[1])
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()


def _device(
    path: Path,
    port: int,
    *,
    protocol: str = "auto",
    on_event: Callable[[Event], None] | None = None,
    link: LinkOptions = LINK,
    embedded: Embedded | None = None,
) -> Device:
    credential = embedded.credential(path) if embedded is not None else None
    device = Device(
        path,
        BrokerOptions(port=port, protocol=protocol, credential=credential),  # type: ignore[arg-type]
        link=link,
        on_event=on_event,
    )
    device.start()
    device.wait_connected(10)
    return device


def _pair(
    tmp: Path,
    port: int,
    policy: Policy,
    *,
    protocol: str = "auto",
    sender_port: int | None = None,
    receiver_port: int | None = None,
    embedded: Embedded | None = None,
) -> tuple[Device, Device, str, list[Event]]:
    events: list[Event] = []
    alice = _device(
        tmp / f"a-{os.urandom(3).hex()}.db",
        sender_port or port,
        protocol=protocol,
        embedded=embedded,
    )
    bob = _device(
        tmp / f"b-{os.urandom(3).hex()}.db",
        receiver_port or port,
        protocol=protocol,
        on_event=events.append,
        embedded=embedded,
    )
    cid = alice.create_conversation([bob.pid], policy=policy)
    _wait(lambda: bool(bob.engine.is_member(cid) and alice.engine._convs[cid].recv), 15, "join")
    time.sleep(0.3)
    return alice, bob, cid, events


# -- roles run in child processes ---------------------------------------------------------


def role_raw_sub(port: int, n: int) -> None:
    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        nonlocal got, first, last
        got += 1
        now = time.time()
        if got == 1:
            first = now
        last = now
        if got >= n:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-sub")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("bench/raw", qos=1)
    client.loop_start()
    print("ready", flush=True)
    cpu = time.process_time()
    done.wait(120)
    cpu = time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"got": got, "last": last, "cpu_s": cpu}), flush=True)


def role_raw_pub(port: int, n: int, size: int) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub")
    client.max_inflight_messages_set(64)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = os.urandom(size)
    print(json.dumps({"start": time.time()}), flush=True)
    cpu = time.process_time()
    infos = [client.publish("bench/raw", payload, qos=1) for _ in range(n)]
    infos[-1].wait_for_publish(60)
    print(json.dumps({"cpu_s": time.process_time() - cpu}), flush=True)
    client.disconnect()
    client.loop_stop()


def role_e2e_recv(state: str, port: int, n: int) -> None:
    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_event(event: Event) -> None:
        nonlocal got, first, last
        if isinstance(event, MessageReceived):
            got += 1
            now = time.time()
            if got == 1:
                first = now
            last = now
            if got >= n:
                done.set()

    device = Device(state, BrokerOptions(port=port), link=LINK, on_event=on_event)
    device.start()
    device.wait_connected(10)
    print("ready", flush=True)
    cpu = time.process_time()
    done.wait(120)
    cpu = time.process_time() - cpu
    device.close()
    print(json.dumps({"got": got, "last": last, "cpu_s": cpu}), flush=True)


def role_e2e_send(state: str, port: int, n: int, cid: str, frame_envelopes: int) -> None:
    link = LINK.model_copy(update={"frame_envelopes": frame_envelopes})
    device = Device(state, BrokerOptions(port=port), link=link)
    device.start()
    device.wait_connected(10)
    print(json.dumps({"start": time.time()}), flush=True)
    cpu = time.process_time()
    for _ in range(n // 50):
        device.send_many(cid, [TEXT] * 50)
    device.wait_drained(60)
    print(json.dumps({"cpu_s": time.process_time() - cpu}), flush=True)
    device.close()


def role_rss(kind: str, port: int, state: str) -> None:
    if kind == "device":
        device = Device(state, BrokerOptions(port=port), link=LINK)
        device.start()
        device.wait_connected(10)
        time.sleep(1.0)
        print(json.dumps({"rss_mb": _rss_mb()}), flush=True)
        device.close()
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rss-paho")
        client.connect("127.0.0.1", port)
        client.subscribe("bench/rss", qos=1)
        client.loop_start()
        time.sleep(1.0)
        print(json.dumps({"rss_mb": _rss_mb()}), flush=True)
        client.disconnect()
        client.loop_stop()


# -- the measurements -----------------------------------------------------------------


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, float]:
    """Every JSON line the child printed, merged."""
    out, _ = proc.communicate(timeout=180)
    merged: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"child failed: {line!r}")


@dataclass(frozen=True)
class Throughput:
    e2e: float
    raw: float
    ratio: float
    ratio_unframed: float  # the device sending one envelope a PUBLISH (frame_envelopes=1)
    size: int
    cpu_us: dict[str, float]


def throughput(tmp: Path, port: int) -> Throughput:
    """Median e2e and raw rates, the median of the per-round ratios, and CPU per message.

    The device sends the burst as it sends any backlog, in frames (PROTOCOL.md §3.4);
    the same run with frames off gives ``throughput_ratio_unframed``: what signing,
    sealing and durability cost when every envelope pays for its own PUBLISH.

    The machine is shared: each round runs the device pair and then bare paho right
    after it, so a ratio compares runs under about the same load, and the median of
    ``THROUGHPUT_ROUNDS`` ratios is less at the mercy of one busy moment. CPU time
    (all threads of each process, from its start signal to its last message) tells
    what the rates cannot on a busy machine: on 2 cores shared by sender, receiver
    and broker, the ratio cannot beat raw CPU per message over ours.
    """
    alice, bob, cid, _ = _pair(tmp, port, Policy())
    alice.send(cid, TEXT)
    size = len(bytes(alice.state._read("SELECT payload FROM sent ORDER BY id DESC LIMIT 1")[0][0]))
    a_path, b_path = alice.state.path, bob.state.path
    alice.close()
    bob.close()
    e2es: list[float] = []
    bares: list[float] = []
    raws: list[float] = []
    cpu: dict[str, list[float]] = {
        "e2e_send": [],
        "e2e_recv": [],
        "unframed_send": [],
        "unframed_recv": [],
        "raw_pub": [],
        "raw_sub": [],
    }
    for _ in range(THROUGHPUT_ROUNDS):
        # as the device sends a backlog (frames of up to 64), then one envelope a PUBLISH
        for frames, rates, label in ((64, e2es, "e2e"), (1, bares, "unframed")):
            recv = _child("e2e-recv", str(b_path), str(port), str(N_THROUGHPUT))
            _wait_ready(recv)
            send = _child("e2e-send", str(a_path), str(port), str(N_THROUGHPUT), cid, str(frames))
            sent = _result(send)
            done = _result(recv)
            rates.append(done["got"] / (done["last"] - sent["start"]))
            cpu[f"{label}_send"].append(sent["cpu_s"] / N_THROUGHPUT)
            cpu[f"{label}_recv"].append(done["cpu_s"] / done["got"])
        sub = _child("raw-sub", str(port), str(N_THROUGHPUT), str(size))
        _wait_ready(sub)
        pub = _child("raw-pub", str(port), str(N_THROUGHPUT), str(size))
        sent = _result(pub)
        done = _result(sub)
        raws.append(done["got"] / (done["last"] - sent["start"]))
        cpu["raw_pub"].append(sent["cpu_s"] / N_THROUGHPUT)
        cpu["raw_sub"].append(done["cpu_s"] / done["got"])
    print(
        f"throughput rounds: e2e {[round(x) for x in e2es]}, unframed "
        f"{[round(x) for x in bares]}, raw {[round(x) for x in raws]}",
        file=sys.stderr,
    )
    ratio = statistics.median(e / r for e, r in zip(e2es, raws, strict=True))
    unframed = statistics.median(e / r for e, r in zip(bares, raws, strict=True))
    cpu_us = {k: round(statistics.median(v) * 1e6, 1) for k, v in cpu.items()}
    return Throughput(
        statistics.median(e2es), statistics.median(raws), ratio, unframed, size, cpu_us
    )


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def rss(tmp: Path, port: int) -> tuple[float, float]:
    path = tmp / "rss.db"
    Device(path).close()
    dev = _result(_child("rss", "device", str(port), str(path)))["rss_mb"]
    bare = _result(_child("rss", "paho", str(port), str(path)))["rss_mb"]
    return dev, bare


@dataclass(frozen=True)
class Wire:
    """Bytes on the wire per message (see :func:`wire`)."""

    sender: float  # the sender's link, its own echo included (3.1.1)
    own_echo: float  # of those, its own messages coming back (3.1.1 only)
    backlog: float  # the sender's, per message of a backlog sent at once, echo excluded
    receiver: float  # the receiver's link, steady state


def wire(
    tmp: Path, port: int, protocol: str, policy: Policy, *, embedded: Embedded | None = None
) -> Wire:
    """Bytes per message on the sender's link (through a counting relay), and of those
    its own echo (3.1.1); per message of a backlog of ``N_BACKLOG`` sent at once
    (frames), own echo excluded; and on the receiver's link (its own relay)."""
    proxy = Proxy(port, echo=protocol == "3.1.1")
    bob_proxy = Proxy(port)
    try:
        alice, bob, cid, _ = _pair(
            tmp,
            port,
            policy,
            protocol=protocol,
            sender_port=proxy.port,
            receiver_port=bob_proxy.port,
            embedded=embedded,
        )
        for _ in range(20):  # warm-up: aliases assigned, first receipts exchanged
            alice.send(cid, TEXT)
        # Steady state: what the join sends once (the re-send to a new member of what
        # it may have missed, GRANT_RESEND_RECEIPTS receipt intervals after its grant)
        # is over before counting starts.
        _wait(
            lambda: (
                not alice._worker.outbound.resends.grants
                and not bob._worker.outbound.resends.grants
            ),
            30,
            "join resends",
        )
        _wait(lambda: len(bob.messages(cid)) >= 20, 30, "the warm-up")
        time.sleep(1.5)
        start, echo_start, bob_start = proxy.bytes, proxy.echo_bytes, bob_proxy.bytes
        for _ in range(N_WIRE):
            alice.send(cid, TEXT)
            time.sleep(0.005)
        alice.wait_drained(30)
        time.sleep(2.5)  # receipts for the run come back
        used = proxy.bytes - start
        echo = proxy.echo_bytes - echo_start
        received = bob_proxy.bytes - bob_start
        start, echo_start = proxy.bytes, proxy.echo_bytes
        alice.send_many(cid, [TEXT] * N_BACKLOG)
        alice.wait_drained(30)
        time.sleep(2.5)
        backlog = proxy.bytes - start - (proxy.echo_bytes - echo_start)
        alice.close()
        bob.close()
        return Wire(used / N_WIRE, echo / N_WIRE, backlog / N_BACKLOG, received / N_WIRE)
    finally:
        proxy.close()
        bob_proxy.close()


def wire_bytes(tmp: Path, mosquitto_port: int) -> dict[str, float]:
    """``wire`` on Mosquitto (keys ``mqtt311_…``, ``mqtt5_aliases_…``) and on the
    embedded broker (``embedded_mqtt311_…``, ``embedded_mqtt5_…``: what a device on
    ``fieldchat up`` pays), both protocol levels and policies; ``…_receiver`` is the
    receiver's link (on MQTT 5 the embedded broker aliases what it sends, Mosquitto
    2.0.11 does not)."""
    wires: dict[str, float] = {}
    embedded = Embedded(tmp / f"embedded-{os.urandom(3).hex()}")
    try:
        for where, port, broker in (
            ("", mosquitto_port, None),
            ("embedded_", embedded.port, embedded),
        ):
            for protocol, level in (
                ("3.1.1", "mqtt311"),
                ("5", "mqtt5" if broker else "mqtt5_aliases"),
            ):
                label = where + level
                for policy, pname in (
                    (Policy(), "signed"),
                    (low_bandwidth_policy(), "low_bandwidth"),
                ):
                    got = wire(tmp, port, protocol, policy, embedded=broker)
                    wires[f"{label}_{pname}"] = round(got.sender, 1)
                    if got.own_echo:  # included above; what no-local would save (MQTT 5 only)
                        wires[f"{label}_{pname}_own_echo"] = round(got.own_echo, 1)
                    wires[f"{label}_{pname}_backlog"] = round(got.backlog, 1)
                    wires[f"{label}_{pname}_receiver"] = round(got.receiver, 1)
    finally:
        embedded.close()
    print(f"wire bytes per message: {wires}", file=sys.stderr)
    return wires


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def repair(tmp: Path, *, one_way_s: float = 0.0, rounds: int = REPAIR_ROUNDS) -> dict[str, float]:
    """How long a message a broker lost takes to reach the screen once a later one
    reveals the gap (a MISSING receipt to the sender, PROTOCOL.md §4.1, and its answer).

    Mosquitto keeps 10 messages of an offline session (``max_queued_messages``) and
    drops the rest; the receiver comes back, shows the 10, and the sender sends one more: the
    receiver holds it behind the gap, asks, the sender publishes the dropped ones
    again, and all are shown in order. ``repair_p50_ms``: from that send to the last
    repaired message on screen; ``deliver_p50_ms``: a plain message, send to screen,
    on the same links; the repair itself is the difference (a round trip to the
    sender and back). ``one_way_s``: each device's link delays every byte this long in
    each direction (a round trip of twice that). Default timings (``LINK``: the
    shipped ``reorder_window_s`` and ``resend_after_s``).
    """
    work = tmp / f"repair-{os.urandom(3).hex()}"
    broker = Broker(work, queued=10, verify_rosters=False)
    gateway = Gateway(work / "gateway", broker.port)  # retains the proposed rosters
    proxies = [DelayProxy(broker.port, one_way_s) for _ in range(2)] if one_way_s else []
    port_a, port_b = (p.port for p in proxies) if proxies else (broker.port, broker.port)
    shown: list[tuple[float, str, bool]] = []

    def on_event(event: Event) -> None:
        if isinstance(event, MessageReceived):
            shown.append((time.perf_counter(), event.text, event.late))

    b_path = tmp / f"rb-{os.urandom(3).hex()}.db"
    alice = _device(tmp / f"ra-{os.urandom(3).hex()}.db", port_a)
    bob = _device(b_path, port_b, on_event=on_event)
    repairs: list[float] = []
    delivers: list[float] = []
    out_of_order = 0
    try:
        cid = alice.create_conversation([bob.pid])
        _wait(lambda: bool(bob.engine.is_member(cid) and alice.engine._convs[cid].recv), 30, "join")
        for r in range(rounds):
            start = time.perf_counter()
            alice.send(cid, f"plain {r}")
            _wait(lambda r=r: any(t == f"plain {r}" for _, t, _ in shown), 30, "a plain message")
            delivers.append(next(at for at, t, _ in shown if t == f"plain {r}") - start)
            _wait(
                lambda: not alice.undelivered(cid) and not alice._worker.outbound.resends.grants,
                30,
                "receipts",
            )
            bob.close()
            lines = [f"r{r}-{i:02d}" for i in range(15)]
            for line in lines:  # one PUBLISH each: Mosquitto keeps 10 and drops the rest
                alice.send(cid, line)
                alice.wait_drained(30)
            shown.clear()
            bob = _device(b_path, port_b, on_event=on_event)
            _wait(lambda r=r: any(t == f"r{r}-09" for _, t, _ in shown), 30, "the queued ones")
            start = time.perf_counter()
            alice.send(cid, f"r{r}-after")
            _wait(lambda r=r: any(t == f"r{r}-after" for _, t, _ in shown), 30, "the repair")
            repairs.append(max(at for at, _, _ in shown) - start)
            got = [t for _, t, _ in shown]
            out_of_order += sum(late for _, _, late in shown) + (got != [*lines, f"r{r}-after"])
    finally:
        alice.close()
        bob.close()
        for proxy in proxies:
            proxy.close()
        gateway.close()
        broker.close()
    out = {
        "repair_p50_ms": round(statistics.median(repairs) * 1000, 1),
        "repair_max_ms": round(max(repairs) * 1000, 1),
        "deliver_p50_ms": round(statistics.median(delivers) * 1000, 1),
        "rounds": rounds,
        "out_of_order": out_of_order,
    }
    print(f"gap repair (one way {one_way_s * 1000:.0f} ms): {out}", file=sys.stderr)
    return out


def repairs(tmp: Path) -> dict[str, dict[str, float]]:
    return {"loopback": repair(tmp), "rtt_500ms": repair(tmp, one_way_s=0.25, rounds=3)}


def reconciliation(tmp: Path) -> dict[str, object]:
    """Bytes on the wire (HTTP request and answer, headers included, through a counting
    relay in front of the gateway) of what the device asks the archive.

    ``tail_bytes_after_reconnect``: the tail round after a reconnect of a device that
    missed nothing (1 conversation, ``N_TAIL`` messages and their receipts exchanged
    live before it: the device names what it holds, ``have``, and gets an empty page).
    ``archive_check_bytes_per_message``: one archive check of N own envelopes the
    archive has (nothing to upload), per envelope: what keeping own envelopes until
    archived costs, by how many one check batches.
    """
    work = tmp / f"reconcile-{os.urandom(3).hex()}"
    broker = Broker(work, verify_rosters=False)
    gateway = Gateway(work / "gateway", broker.port)  # retains the proposed rosters
    relay = Proxy(gateway.port)
    base = f"http://127.0.0.1:{relay.port}"
    link = LINK.model_copy(update={"history_tail_s": 3600.0, "archive_check_s": 0.5})
    alice = _device(work / "a.db", broker.port, link=link)
    bob = Device(work / "b.db", BrokerOptions(port=broker.port), link=link)
    bob.history = GatewayHistory(base, bob.engine.identity)
    bob.start().wait_connected(10)
    checks: dict[str, float] = {}
    try:
        cid = alice.create_conversation([bob.pid])
        _wait(lambda: bool(bob.engine.is_member(cid) and alice.engine._convs[cid].recv), 30, "join")
        for _ in range(N_TAIL // 10):
            alice.send_many(cid, [TEXT] * 10)
            bob.send(cid, TEXT)
        _wait(lambda: len(bob.messages(cid)) == N_TAIL, 30, "the messages, live")
        _wait(lambda: len(alice.messages(cid)) == N_TAIL // 10, 30, "bob's, live")
        _wait(lambda: not bob.receipts_pending and not bob.outbox(), 30, "bob's receipts out")
        _wait(lambda: bob.state.unarchived_count() == 0, 60, "bob's envelopes archived")
        bob.close()
        bob = Device(work / "b.db", BrokerOptions(port=broker.port), link=link)
        bob.history = GatewayHistory(base, bob.engine.identity)
        before = relay.bytes
        bob.start().wait_connected(10)
        _wait(lambda: bob.counters["history_tail_rounds"] >= 1, 30, "the tail round")
        tail = relay.bytes - before
        if bob.counters["history_tail_fetched"]:
            raise RuntimeError("the tail of a device that missed nothing fetched envelopes")
        archive = GatewayHistory(base, alice.engine.identity)
        for n in (1, 10, 100, 1_000):
            alice.send_many(cid, [TEXT] * n)
            alice.wait_drained(30)
            time.sleep(0.5)  # archived: the archiver commits every 20 ms
            rows = [r for r in alice.state.unarchived(time.time(), 10_000) if r.cid == cid][-n:]
            before = relay.bytes
            outcome = reconcile(archive, rows)
            if outcome.errors or outcome.uploaded or outcome.checked != n:
                raise RuntimeError(f"archive check of {n}: {outcome}")
            checks[str(n)] = round((relay.bytes - before) / n, 1)
    finally:
        alice.close()
        bob.close()
        relay.close()
        gateway.close()
        broker.close()
    print(f"tail after reconnect: {tail} B; archive check B/message: {checks}", file=sys.stderr)
    return {"tail_bytes_after_reconnect": tail, "archive_check_bytes_per_message": checks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="main")
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    if ns.role == "raw-sub":
        role_raw_sub(int(ns.args[0]), int(ns.args[1]))
        return
    if ns.role == "raw-pub":
        role_raw_pub(int(ns.args[0]), int(ns.args[1]), int(ns.args[2]))
        return
    if ns.role == "e2e-recv":
        role_e2e_recv(ns.args[0], int(ns.args[1]), int(ns.args[2]))
        return
    if ns.role == "e2e-send":
        role_e2e_send(ns.args[0], int(ns.args[1]), int(ns.args[2]), ns.args[3], int(ns.args[4]))
        return
    if ns.role == "rss":
        role_rss(ns.args[0], int(ns.args[1]), ns.args[2])
        return
    if ns.role == "repair":
        with tempfile.TemporaryDirectory() as name:
            print(json.dumps({"gap_repair_ms": repairs(Path(name))}))
        return
    if ns.role == "wire":
        with tempfile.TemporaryDirectory() as name:
            broker = Broker(Path(name))
            try:
                wires = wire_bytes(Path(name), broker.port)
            finally:
                broker.close()
            print(
                json.dumps(
                    {
                        "wire_bytes_per_message": wires,
                        "wire_bytes_embedded_low_bandwidth": wires["embedded_mqtt5_low_bandwidth"],
                    }
                )
            )
        return
    if ns.role == "reconcile":
        with tempfile.TemporaryDirectory() as name:
            print(json.dumps(reconciliation(Path(name))))
        return
    if ns.role in ("latency", "throughput"):  # one part alone, while tuning
        with tempfile.TemporaryDirectory() as name:
            broker = Broker(Path(name))
            try:
                if ns.role == "latency":
                    print(json.dumps(_latency(Path(name), broker.port)))
                else:
                    t = throughput(Path(name), broker.port)
                    print(
                        json.dumps(
                            {
                                "e2e": round(t.e2e),
                                "raw": round(t.raw),
                                "ratio": round(t.ratio, 3),
                                "ratio_unframed": round(t.ratio_unframed, 3),
                                "cpu_us_per_msg": t.cpu_us,
                            }
                        )
                    )
            finally:
                broker.close()
        return
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        broker = Broker(tmp)
        try:
            t = throughput(tmp, broker.port)
            print(
                f"throughput: e2e {t.e2e:.0f}/s, raw paho {t.raw:.0f}/s ({t.size} B payload)",
                file=sys.stderr,
            )
            lat = _latency(tmp, broker.port)
            rss_dev, rss_paho = rss(tmp, broker.port)
            wires = wire_bytes(tmp, broker.port)
        finally:
            broker.close()
        repaired = repairs(tmp)
        reconciled = reconciliation(tmp)
    print(
        json.dumps(
            {
                "e2e_msgs_per_s": round(t.e2e, 1),
                "raw_paho_msgs_per_s": round(t.raw, 1),
                "throughput_ratio": round(t.ratio, 3),
                "throughput_ratio_unframed": round(t.ratio_unframed, 3),
                "cpu_us_per_msg": t.cpu_us,
                "added_latency_p50_ms": _added(lat, "p50"),
                "added_latency_p99_ms": _added(lat, "p99"),
                "latency_ms": {k: round(v, 3) for k, v in lat.items()},
                "rss_mb_device": round(rss_dev, 1),
                "rss_mb_bare_paho": round(rss_paho, 1),
                "wire_bytes_per_message": wires,
                "wire_bytes_embedded_low_bandwidth": wires["embedded_mqtt5_low_bandwidth"],
                "gap_repair_ms": repaired,
                **reconciled,
            }
        )
    )


def _latency(tmp: Path, port: int) -> dict[str, float]:
    """Device and bare paho latency, measured interleaved in one run.

    Both streams run at 50 messages/s each over the same broker, their sends
    alternating every 10 ms, so both see the same machine (other processes, CPU
    frequency, the broker's state): a stall hits both rather than whichever
    happened to run then. Percentiles pool ``LATENCY_ROUNDS`` rounds (past each
    round's warm-up); the added latency is the difference of the pooled
    percentiles, and a negative difference is reported as invalid (``None``), never
    as a gain.
    """
    lat_dev: list[float] = []
    lat_raw: list[float] = []

    def on_event(event: Event) -> None:
        if isinstance(event, MessageReceived):
            lat_dev.append(time.perf_counter() - float(event.text[:20]))

    alice = _device(tmp / "lat-a.db", port)
    bob = _device(tmp / "lat-b.db", port, on_event=on_event)
    cid = alice.create_conversation([bob.pid])
    end = time.monotonic() + 15
    while not (bob.engine.is_member(cid) and alice.engine._convs[cid].recv) and (
        time.monotonic() < end
    ):
        time.sleep(0.02)
    alice.send(cid, f"{time.perf_counter():20.6f}".ljust(60, "x"))  # warm-up
    size = len(bytes(alice.state._read("SELECT payload FROM sent ORDER BY id DESC LIMIT 1")[0][0]))
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lat-sub")
    sub.on_message = lambda _c, _u, m: lat_raw.append(
        time.perf_counter() - float(m.payload[:20].decode())
    )
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/lat", qos=1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lat-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(1.2)  # past the first receipt batch
    dev: list[float] = []
    raw: list[float] = []
    try:
        for _ in range(LATENCY_ROUNDS):
            lat_dev.clear()
            lat_raw.clear()
            tick = time.perf_counter()
            for _ in range(N_LATENCY):
                stamp = f"{time.perf_counter():20.6f}"
                pub.publish("bench/lat", stamp.encode().ljust(size, b"x"), qos=1)
                tick += 0.01
                time.sleep(max(0.0, tick - time.perf_counter()))
                alice.send(cid, f"{time.perf_counter():20.6f}".ljust(60, "x"))
                tick += 0.01
                time.sleep(max(0.0, tick - time.perf_counter()))
            end = time.monotonic() + 10
            while (len(lat_dev) < N_LATENCY or len(lat_raw) < N_LATENCY) and (
                time.monotonic() < end
            ):
                time.sleep(0.05)
            dev += lat_dev[LATENCY_WARMUP:]
            raw += lat_raw[LATENCY_WARMUP:]
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
        alice.close()
        bob.close()
    if not dev or not raw:
        raise RuntimeError("no messages in the latency run")
    out = {
        "device_p50_ms": _pct(dev, 50) * 1000,
        "device_p99_ms": _pct(dev, 99) * 1000,
        "raw_p50_ms": _pct(raw, 50) * 1000,
        "raw_p99_ms": _pct(raw, 99) * 1000,
        "samples": float(min(len(dev), len(raw))),
    }
    print(f"latency (ms): {out}", file=sys.stderr)
    return out


def _added(lat: dict[str, float], pct: str) -> float | None:
    added = lat[f"device_{pct}_ms"] - lat[f"raw_{pct}_ms"]
    if added < 0:  # within the noise of the reference: not a measurement of anything
        print(
            f"added latency {pct} came out negative ({added:.2f} ms): reported as null",
            file=sys.stderr,
        )
        return None
    return round(added, 3)


if __name__ == "__main__":
    main()
