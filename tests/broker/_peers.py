"""MQTT test peers (paho on its own network thread), shared by the broker tests: 3.1.1
by default, MQTT 5 with ``protocol=mqtt.MQTTv5`` (a persistent session is then one with
a Session Expiry Interval of an hour, as ``clean=False`` means in 3.1.1)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

WAIT_S = 5.0


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class Peer:
    """A synchronous MQTT client for tests (paho on its own network thread)."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        clean: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
        transport: Literal["tcp", "websockets", "unix"] = "tcp",
        tls: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        bind: str = "",
        protocol: MQTTProtocolVersion = mqtt.MQTTv311,
    ) -> None:
        self.port, self.host, self.bind = port, host, bind
        self.protocol, self.clean = protocol, clean
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else (username or ""),
            clean_session=clean if protocol != mqtt.MQTTv5 else None,
            protocol=protocol,
            transport=transport,
            reconnect_on_failure=False,
        )
        if tls is not None:
            self.client.tls_set(**tls)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        self.keepalive = keepalive
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: queue.Queue[tuple[bool, int, bool]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.connected = False
        self.refusal: str | None = None

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack.put((not reason_code.is_failure, reason_code.value, flags.session_present))

    def _on_message(self, client, userdata, msg):
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, msg.retain, msg.dup))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks.put([rc.value for rc in reason_codes])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def connect(self, *, expect_ok: bool = True) -> tuple[bool, int, bool]:
        """Connect and wait for CONNACK: ``(accepted, paho reason value, session present)``."""
        if self.protocol == mqtt.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            if not self.clean:
                properties.SessionExpiryInterval = 3600
            self.client.connect(
                self.host,
                self.port,
                keepalive=self.keepalive,
                bind_address=self.bind,
                clean_start=self.clean,
                properties=properties,
            )
        else:
            self.client.connect(
                self.host, self.port, keepalive=self.keepalive, bind_address=self.bind
            )
        self.client.loop_start()
        try:
            result = self.connack.get(timeout=WAIT_S)
        except queue.Empty:
            result = (False, -1, False)
        self.connected = result[0]
        if expect_ok:
            assert result[0], f"connection refused: {result}"
        return result

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and return the SUBACK code (0, 1, 2, or 128 for failure: MQTT 5's
        failure codes, which say why, are returned as 128 too)."""
        self.client.subscribe(topic, qos)
        code = self.subacks.get(timeout=WAIT_S)[0]
        return 128 if code >= 0x80 else code

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish; for QoS 1, wait for the PUBACK. Returns whether it was acknowledged."""
        info = self.client.publish(topic, payload, qos, retain)
        if qos == 0:
            return True
        deadline = time.monotonic() + WAIT_S
        try:
            while not info.is_published() and time.monotonic() < deadline:
                if self.disconnected.is_set():
                    return False
                time.sleep(0.005)
            return info.is_published()
        except RuntimeError as exc:  # paho: "not currently connected" (a refused publish)
            self.refusal = str(exc)
            return False

    def expect(self, count: int, timeout: float = WAIT_S) -> list[Received]:
        out: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                out.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                break
        return out

    def drain(self, quiet: float = 0.5) -> list[Received]:
        """Everything that arrives until ``quiet`` seconds pass without a message."""
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return out

    def disconnect(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.close()

    def close(self) -> None:
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def drop(self) -> None:
        """Vanish without DISCONNECT (as a lost link): the broker sees the socket close."""
        sock = self.client.socket()
        if sock is not None:
            assert isinstance(sock, socket.socket)  # TCP or TLS (an SSLSocket is one)
            sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()
        if sock is not None:
            sock.close()
