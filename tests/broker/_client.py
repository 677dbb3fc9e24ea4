"""A raw-socket MQTT client on the codec (schemas.mqtt), either protocol level, for the
conformance tests: it sends exactly the packets a test says and acknowledges nothing
on its own."""

from __future__ import annotations

import socket
import time

from fieldchat.schemas import mqtt

WAIT_S = 5.0


class Client:
    def __init__(self, port: int, level: int = 5) -> None:
        self.level = level
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.decoder = mqtt.Decoder(level=level)
        self.pending: list[mqtt.Packet] = []

    def send(self, packet: mqtt.Packet) -> None:
        self.sock.sendall(mqtt.encode(packet, self.level))

    def read(self, timeout: float = WAIT_S) -> mqtt.Packet:
        """The next packet; ``ConnectionError`` if the broker closes first."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def connect(
        self,
        client_id: str,
        username: str | None,
        password: str | None,
        *,
        clean: bool = True,
        keep_alive: int = 60,
        will: mqtt.Will | None = None,
        **properties: object,
    ) -> mqtt.Connack:
        self.send(
            mqtt.Connect(
                client_id,
                clean,
                keep_alive,
                username,
                None if password is None else password.encode(),
                will,
                self.level,
                # 3.1.1 has no properties: a 3.1.1 client drops them (clean=False persists)
                mqtt.Properties(**properties)  # type: ignore[arg-type]
                if properties and self.level == mqtt.ProtocolLevel.V5
                else mqtt.NO_PROPERTIES,
            )
        )
        connack = self.read()
        assert isinstance(connack, mqtt.Connack), connack
        return connack

    def subscribe(
        self, topic_filter: str, qos: int = 1, *, identifier: int | None = None, **options
    ) -> tuple[int, ...]:
        properties = mqtt.NO_PROPERTIES
        if identifier is not None:
            properties = mqtt.Properties(subscription_identifiers=(identifier,))
        self.send(mqtt.Subscribe(1, (mqtt.Subscription(topic_filter, qos, **options),), properties))
        suback = self.read()
        assert isinstance(suback, mqtt.Suback), suback
        return suback.reason_codes

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        packet_id: int = 1,
        *,
        retain: bool = False,
        dup: bool = False,
        **properties: object,
    ) -> mqtt.Packet | None:
        """Publish; for QoS 1 and 2 return the broker's PUBACK / PUBREC."""
        props = mqtt.Properties(**properties) if properties else mqtt.NO_PROPERTIES  # type: ignore[arg-type]
        self.send(mqtt.Publish(topic, payload, qos, retain, dup, packet_id if qos else None, props))
        if not qos:
            return None
        return self.read()

    def messages(
        self, count: int, timeout: float = WAIT_S, *, ack: bool = True
    ) -> list[mqtt.Publish]:
        """The next ``count`` PUBLISH packets (fewer if ``timeout`` passes first)."""
        out: list[mqtt.Publish] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            try:
                packet = self.read(deadline - time.monotonic())
            except TimeoutError:
                break
            if isinstance(packet, mqtt.Publish):
                out.append(packet)
                if ack and packet.qos == 1 and packet.packet_id:
                    self.send(mqtt.Puback(packet.packet_id))
        return out

    def quiet(self, seconds: float, *, ack: bool = True) -> list[mqtt.Publish]:
        """Every PUBLISH that arrives within ``seconds``."""
        return self.messages(1 << 30, seconds, ack=ack)

    def closed(self, timeout: float = WAIT_S) -> tuple[bool, mqtt.Disconnect | None]:
        """Whether the broker closes within ``timeout``, and its DISCONNECT if it sent one."""
        disconnect = None
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                packet = self.read(deadline - time.monotonic())
                if isinstance(packet, mqtt.Disconnect):
                    disconnect = packet
        except (ConnectionError, OSError):
            return True, disconnect
        except TimeoutError:
            pass
        return False, disconnect

    def disconnect(self, reason: int = 0, **properties: object) -> None:
        props = mqtt.Properties(**properties) if properties else mqtt.NO_PROPERTIES  # type: ignore[arg-type]
        self.send(mqtt.Disconnect(reason, props))
        self.close()

    def close(self) -> None:
        self.sock.close()
