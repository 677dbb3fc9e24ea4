"""A loopback TCP front for a broker that reads what crosses it, for the device tests.

Each connection's packets are decoded with the shared codec (``schemas.mqtt``), both
ways, and kept: what a device publishes (topic, Topic Alias) and what it is sent (its
own messages coming back or not: No Local). ``refuse_v5`` makes it play a broker that
does not speak MQTT 5: ``"connack"`` answers a v5 CONNECT with CONNACK 0x84 (an MQTT 5
server's refusal), ``"connack311"`` with a 3.1.1 CONNACK of return code 1 (a 3.1.1
server's, MQTT-3.1.2-2; aMQTT's), ``"close"`` closes it without a CONNACK; 3.1.1
CONNECTs pass through to the real broker. ``close_v5_times`` closes only the first
that many v5 CONNECTs (a broker shedding sockets, a link dropping). ``drop_down``
plays a broker that loses what it should send: each packet to a client for which it
answers true is not relayed (what is relayed is then re-encoded packet by packet).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import MalformedPacket

V5, V311 = int(mqtt.ProtocolLevel.V5), int(mqtt.ProtocolLevel.V311)


@dataclass
class Link:
    """One client connection through the front."""

    level: int
    up: list[mqtt.Packet] = field(default_factory=list)  # client -> broker
    down: list[mqtt.Packet] = field(default_factory=list)  # broker -> client
    bytes_up: int = 0
    bytes_down: int = 0

    def publishes(self, *, down: bool = False) -> list[mqtt.Publish]:
        return [p for p in (self.down if down else self.up) if isinstance(p, mqtt.Publish)]

    def on(self, topic: str, *, down: bool = False) -> list[mqtt.Publish]:
        """The PUBLISH packets to ``topic``, named or by its Topic Alias."""
        aliases: dict[int, str] = {}
        found = []
        for p in self.publishes(down=down):
            alias = p.properties.topic_alias
            if alias is not None and p.topic:
                aliases[alias] = p.topic
            if (p.topic or aliases.get(alias or 0)) == topic:
                found.append(p)
        return found


class Front:
    """Listens on 127.0.0.1 (``port``) and relays to the broker on ``target``."""

    def __init__(
        self,
        target: int,
        *,
        refuse_v5: str | None = None,
        close_v5_times: int = 0,
        port: int = 0,
        drop_down: Callable[[mqtt.Packet], bool] | None = None,
    ):
        self.target = target
        self.drop_down = drop_down
        self.dropped: list[mqtt.Packet] = []
        self.refuse_v5 = refuse_v5
        self.close_v5_left = close_v5_times
        self.levels: list[int] = []  # the protocol level of every CONNECT, in order
        self.links: list[Link] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", port))  # port: again after close
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop listening and cut every relayed connection (shutdown wakes the relay
        threads blocked in recv, which a close alone does not)."""
        for sock in [self.listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def last(self) -> Link:
        return self.links[-1]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        decoder = mqtt.Decoder()
        buf = b""
        packets: list[mqtt.Packet] = []
        with contextlib.suppress(OSError, MalformedPacket):
            while not packets:
                data = client.recv(65536)
                if not data:
                    raise OSError("closed before CONNECT")
                buf += data
                packets = decoder.feed(data)
            connect = packets[0]
            assert isinstance(connect, mqtt.Connect)
            level = connect.protocol_level
            how = None
            with self._lock:
                self.levels.append(level)
                if level == V5 and self.close_v5_left > 0:
                    self.close_v5_left -= 1
                    how = "close"
                elif level == V5:
                    how = self.refuse_v5
            if how is not None:
                if how == "connack":
                    client.sendall(mqtt.encode(mqtt.Connack(reason_code=0x84), V5))
                elif how == "connack311":
                    client.sendall(mqtt.encode(mqtt.Connack(reason_code=1), V311))
                client.close()
                return
            link = Link(level, up=list(packets), bytes_up=len(buf))
            self.links.append(link)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets.append(upstream)
            upstream.sendall(buf)
            threading.Thread(
                target=self._pipe, args=(upstream, client, link, True), daemon=True
            ).start()
            self._pipe(client, upstream, link, False, decoder)
        with contextlib.suppress(OSError):
            client.close()

    def _drop(self, packet: mqtt.Packet) -> bool:
        assert self.drop_down is not None
        with self._lock:
            if self.drop_down(packet):
                self.dropped.append(packet)
                return True
        return False

    def _pipe(
        self,
        src: socket.socket,
        dst: socket.socket,
        link: Link,
        down: bool,
        decoder: mqtt.Decoder | None = None,
    ) -> None:
        decoder = decoder or mqtt.Decoder(level=link.level)
        try:
            while data := src.recv(65536):
                if down and self.drop_down is not None:
                    packets = decoder.feed(data)
                    kept = [p for p in packets if not self._drop(p)]
                    dst.sendall(b"".join(mqtt.encode(p, link.level) for p in kept))
                else:
                    dst.sendall(data)
                    packets = decoder.feed(data)
                with self._lock:
                    if down:
                        link.bytes_down += len(data)
                        link.down += packets
                    else:
                        link.bytes_up += len(data)
                        link.up += packets
        except (OSError, MalformedPacket):
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.close()
