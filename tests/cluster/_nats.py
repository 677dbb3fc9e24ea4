"""A three-node NATS cluster (JetStream + MQTT) on 127.0.0.1, for the cluster tests.

Each node is Debian's ``nats-server`` with a configuration rendered from
``deploy/nats/node.conf.template`` (so the template operators use is the one tested)
and an ``accounts.conf`` written by :func:`accounts_conf` from the participants and
gateways enrolled so far. Every port is ephemeral; the system nats-server on 4222
is never touched.

How fieldchat identities map to NATS (docs/cluster.md, "Authorization"): one account
``FIELDCHAT`` with JetStream; one NATS user per participant (user = MQTT username =
client id = pid, password = its credential) whose publish/subscribe permissions are
the fieldchat topic rules translated to NATS subjects; one user per gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from string import Template
from typing import Any

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"
TEMPLATE = DEPLOY / "node.conf.template"
MESSAGE_STREAM = DEPLOY / "mqtt-msgs.stream.json"
ACCOUNT = "FIELDCHAT"
OPERATOR = "fieldchat-ops"  # creates the MQTT message stream over the NATS port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subject_prefix(prefix: str) -> str:
    """The NATS subject of an MQTT topic prefix: ``fc/v1`` -> ``fc.v1``."""
    return prefix.replace("/", ".")


def device_permissions(pid: str, prefix: str) -> dict[str, object]:
    """The fieldchat topic rules (DESIGN.md, Topics) for participant ``pid``, as NATS
    subject permissions. NATS cannot read rosters, so ``c/{cid}/…`` is open to every
    participant of the account: conversation membership is enforced end to end only
    (ciphertext, signed rosters) and by the gateway's archive rules, not by NATS.
    For the same reason no participant may write a roster: it *proposes* one on
    ``c/{cid}/propose`` (which only gateways may read), and the gateway, which
    verifies the chain to epoch 0, republishes it retained on ``c/{cid}/roster``."""
    s = subject_prefix(prefix)
    return {
        "publish": {
            "allow": [
                f"{s}.p.{pid}.bundle",
                f"{s}.p.{pid}.status",
                f"{s}.p.*.inbox",
                f"{s}.c.*.propose",
                f"{s}.c.*.msg",
            ]
        },
        # $MQTT.sub.> : the internal delivery subjects of this client's own QoS 1
        # subscriptions (JetStream consumers push there), needed by every MQTT client.
        "subscribe": {
            "allow": [
                f"{s}.p.{pid}.inbox",
                f"{s}.p.*.bundle",
                f"{s}.p.*.status",
                f"{s}.c.*.roster",
                f"{s}.c.*.msg",
                "$MQTT.sub.>",
            ]
        },
    }


def gateway_permissions(prefix: str) -> dict[str, object]:
    """A gateway archives everything and relays browsers' publications."""
    s = subject_prefix(prefix)
    return {
        "publish": {"allow": [f"{s}.>"]},
        "subscribe": {"allow": [f"{s}.>", "$MQTT.sub.>"]},
    }


def operator_permissions() -> dict[str, object]:
    """The operator user: the JetStream API of the account, nothing of fieldchat's."""
    return {
        "publish": {"allow": ["$JS.API.>"]},
        "subscribe": {"allow": ["_INBOX.>"]},
    }


def nats_request(
    port: int, user: str, password: str, subject: str, payload: bytes, timeout: float = 5.0
) -> dict[str, Any]:
    """One request/reply over the NATS client protocol (what ``nats req`` does).

    The tests have no NATS client library; the protocol is text lines, and the
    JetStream API answers every request with one JSON message.
    """
    inbox = f"_INBOX.{secrets.token_hex(8)}"
    hello = {"user": user, "pass": password, "verbose": False, "pedantic": False}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        if not reader.readline().startswith(b"INFO "):
            raise RuntimeError("not a NATS server")
        sock.sendall(
            f"CONNECT {json.dumps(hello)}\r\nSUB {inbox} 1\r\n"
            f"PUB {subject} {inbox} {len(payload)}\r\n".encode()
            + payload
            + b"\r\nPING\r\n"
        )
        for _ in range(100):  # bounded: PONG, the odd PING, then the reply
            line = reader.readline()
            if not line:
                raise RuntimeError(f"NATS closed the connection before replying to {subject}")
            if line.startswith(b"-ERR"):
                raise RuntimeError(f"NATS refused {subject}: {line.decode().strip()}")
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                return dict(json.loads(reader.read(size + 2)[:size]))
    raise RuntimeError(f"no reply to {subject}")


def accounts_conf(users: dict[str, tuple[str, dict[str, object]]]) -> str:
    """``accounts.conf``: the FIELDCHAT account (JetStream on) and its users.

    JSON is valid NATS configuration syntax, so values are written with
    :func:`json.dumps` and need no escaping of our own.
    """
    entries = [
        {"user": name, "password": password, "permissions": permissions}
        for name, (password, permissions) in sorted(users.items())
    ]
    body = {ACCOUNT: {"jetstream": "enabled", "users": entries}}
    return f"accounts: {json.dumps(body, indent=2)}\n"


class PortTaken(RuntimeError):
    """A node could not bind a port picked for it (another process took it first)."""


class Node:
    """One ``nats-server`` process; its ports and store survive :meth:`kill`."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.dir = workdir
        self.name = name
        self.pick_ports()
        self.config = workdir / "node.conf"
        self.log = workdir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def pick_ports(self) -> None:
        """Free ephemeral ports, each free when picked (another process may take one
        before the node binds it: :meth:`Cluster.start` then picks again)."""
        self.client_port = free_port()
        self.http_port = free_port()
        self.cluster_port = free_port()
        self.mqtt_port = free_port()

    def render(self, peers: list[Node], accounts_file: Path) -> None:
        routes = ",\n    ".join(f"nats-route://127.0.0.1:{p.cluster_port}" for p in peers)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            Template(TEMPLATE.read_text()).substitute(
                name=self.name,
                host="127.0.0.1",
                client_port=self.client_port,
                http_port=self.http_port,
                cluster_port=self.cluster_port,
                mqtt_port=self.mqtt_port,
                store_dir=self.dir / "jetstream",
                max_file_store="1GB",
                cluster_name="fieldchat-test",
                routes=routes,
                # nats-server resolves an include relative to the including file.
                accounts_file=os.path.relpath(accounts_file, self.dir),
            )
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, no leadership hand-over."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (new users) without dropping anyone."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def healthy(self) -> bool:
        """``/healthz``: the node serves and its JetStream is current with the cluster."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=1
            ) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def varz(self, what: str = "varz") -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/{what}", timeout=2
        ) as reply:
            return dict(json.loads(reply.read()))

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Cluster:
    """Three nodes routed to each other, sharing one ``accounts.conf``."""

    def __init__(self, workdir: Path, *, prefix: str = "fc/v1", size: int = 3) -> None:
        self.dir = workdir
        self.prefix = prefix
        self.nodes = [Node(workdir / f"n{i + 1}", f"n{i + 1}") for i in range(size)]
        self.accounts = workdir / "accounts.conf"
        self.users: dict[str, tuple[str, dict[str, object]]] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        self._add(OPERATOR, operator_permissions())
        for node in self.nodes:
            node.render([n for n in self.nodes if n is not node], self.accounts)

    def _write_accounts(self) -> None:
        # The file holds credentials: owner-only, as a password file should be.
        tmp = self.accounts.with_suffix(".tmp")
        tmp.write_text(accounts_conf(self.users))
        tmp.chmod(0o600)
        tmp.replace(self.accounts)

    def _add(self, name: str, permissions: dict[str, object]) -> str:
        if name not in self.users:
            self.users[name] = (secrets.token_urlsafe(24), permissions)
            self._write_accounts()
            for node in self.nodes:
                node.reload()
        return self.users[name][0]

    def device(self, pid: str) -> str:
        """Enroll participant ``pid``; its credential (MQTT password)."""
        return self._add(pid, device_permissions(pid, self.prefix))

    def gateway(self, name: str) -> str:
        """Enroll gateway user ``name``; its credential."""
        return self._add(name, gateway_permissions(self.prefix))

    def start(self, timeout: float = 30.0) -> Cluster:
        for attempt in range(3):  # bounded: a port taken between pick and bind
            for node in self.nodes:
                node.start()
            try:
                self.wait_healthy(timeout)
                break
            except PortTaken:
                if attempt == 2:
                    raise
                self._fresh_ports()
        self.create_message_stream(timeout)
        return self

    def _fresh_ports(self) -> None:
        """Stop every node, forget the store of this first start, pick new ports and
        render the configurations again (each names its peers' cluster ports)."""
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node.dir / "jetstream", ignore_errors=True)
            node.pick_ports()
        for node in self.nodes:
            node.render([n for n in self.nodes if n is not node], self.accounts)

    def create_message_stream(self, timeout: float = 30.0) -> dict[str, Any]:
        """Create ``$MQTT_msgs`` from ``deploy/nats/mqtt-msgs.stream.json`` before any
        MQTT client connects, as the deploy recipe does (docs/cluster.md, "Node loss").

        NATS's MQTT layer uses an existing ``$MQTT_msgs`` as it is; the one it would
        create has interest retention, and 2.9.10 removes messages from it that a
        subscriber whose node was lost still needs. The first request after the meta
        leader election can time out, so it is retried until ``timeout``. Creating it
        again with the same file is a no-op; a different existing one is an error.
        """
        body = MESSAGE_STREAM.read_bytes()
        name = json.loads(body)["name"]
        end = time.monotonic() + timeout
        for _ in range(100):  # bounded: each attempt takes up to 5 s
            try:
                reply = nats_request(
                    self.nodes[0].client_port,
                    OPERATOR,
                    self.users[OPERATOR][0],
                    f"$JS.API.STREAM.CREATE.{name}",
                    body,
                )
            except (OSError, RuntimeError) as exc:
                reply = {"error": {"description": str(exc)}}
            if "error" not in reply:
                return reply
            if time.monotonic() > end:
                raise RuntimeError(f"cannot create the {name} stream: {reply['error']}")
            time.sleep(0.5)
        raise RuntimeError(f"cannot create the {name} stream")

    def message_stream(self) -> dict[str, Any] | None:
        """``$MQTT_msgs`` as JetStream monitoring shows it (config, state, leader)."""
        for node in self.nodes:
            if not node.running:
                continue
            info = node.varz("jsz?accounts=true&streams=true&config=true")
            for account in info.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") == "$MQTT_msgs":
                        return dict(stream)
        return None

    def consumers(self, stream: str = "$MQTT_msgs") -> list[dict[str, Any]] | None:
        """The consumers of ``stream`` as their leaders report them (JetStream API), or
        ``None`` while the API cannot answer for every one of them. A consumer's
        ``push_bound`` is whether its leader sees a subscriber on its delivery subject."""
        node = next(n for n in self.nodes if n.running)
        try:
            reply = nats_request(
                node.client_port,
                OPERATOR,
                self.users[OPERATOR][0],
                f"$JS.API.CONSUMER.LIST.{stream}",
                b"{}",
            )
        except (OSError, RuntimeError):
            return None
        if "error" in reply or reply.get("missing"):
            return None
        return list(reply.get("consumers") or [])

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running node healthy (JetStream meta leader elected, streams current)."""
        end = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    tail = node.tail()
                    if "address already in use" in tail.rsplit("--- start ", 1)[-1]:
                        raise PortTaken(f"nats-server {node.name}: a port was taken")
                    raise RuntimeError(f"nats-server {node.name} exited:\n{tail}")
            if all(node.healthy() for node in self.nodes if node.running):
                return
            if time.monotonic() > end:
                logs = "\n".join(f"{n.name}:\n{n.tail(1500)}" for n in self.nodes)
                raise RuntimeError(f"NATS cluster not healthy after {timeout} s\n{logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                node.stop()

    def mqtt_url(self, index: int) -> str:
        return f"mqtt://127.0.0.1:{self.nodes[index].mqtt_port}"
