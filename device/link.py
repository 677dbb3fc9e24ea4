"""The MQTT link of a device: one thread that connects, runs paho's network loop and
reconnects with exponential backoff and full jitter.

Each connection is a fresh paho client (:class:`LinkConnection`). The device's outbox,
not paho's memory, is what survives a lost connection: after a reconnect the device
publishes again everything the broker had not acknowledged. A fresh client per
connection also makes MQTT 5 topic aliases safe (they are scoped to one connection,
MQTT 5 §3.3.2.3.4, and paho would retransmit an aliased PUBLISH with an empty topic
on a new connection) and lets ``protocol="auto"`` fall back to MQTT 3.1.1 when a
broker (aMQTT) does not speak 5 (:mod:`fieldchat.device.fallback` decides when).

Callbacks run on the link thread and must be quick: the device only enqueues.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fieldchat.device.config import BrokerOptions, LinkOptions
from fieldchat.device.fallback import AttemptOutcome, ProtocolFallback
from fieldchat.schemas.errors import ConnectFailed, NotAuthorized, TransportError

__all__ = ["SESSION_EXPIRY_S", "Link", "LinkConnection", "LinkHandler", "PubackRefusal"]

log = logging.getLogger("fieldchat.device.link")

SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5 session expiry: a week offline keeps the queue
# The Topic Alias Maximum we announce (MQTT 5 §3.1.2.11.5): the broker may then name each
# topic it sends us once and alias it after (a device reads a handful of topics; each
# message it receives then carries 2 bytes of alias instead of a ≈ 38-byte name).
INBOUND_ALIASES = 16
_LOOP_TIMEOUT_S = 0.05
_SUBSCRIBE_CHUNK = 64
# CONNACK reason codes (MQTT 5 §3.2.2.2; paho maps 3.1.1 return codes 4/5 to 134/135).
_BAD_CREDENTIALS = frozenset({134, 135, 138})
_UNSUPPORTED_PROTOCOL = 132


@dataclass(frozen=True, slots=True)
class PubackRefusal:
    """A broker's negative PUBACK (MQTT 5 §3.4.2.1: a reason code of 0x80 or more),
    e.g. 0x87 Not authorized, 0x90 Topic Name invalid, 0x97 Quota exceeded. MQTT 3.1.1
    has none: a broker there acknowledges, drops, or disconnects."""

    code: int
    name: str


class LinkHandler(Protocol):
    """What the link tells the device (called on the link thread)."""

    def link_connected(self, conn: LinkConnection, session_present: bool) -> None: ...

    def link_message(
        self, conn: LinkConnection, mid: int, topic: str, payload: bytes, qos: int
    ) -> None: ...

    def link_published(self, conn: LinkConnection, mid: int, refusal: PubackRefusal | None) -> None:
        """The broker acknowledged packet ``mid``; ``refusal`` when it refused it."""

    def link_disconnected(self, conn: LinkConnection, reason: str) -> None: ...

    def link_refused(self, conn: LinkConnection, topics: list[str]) -> None: ...

    def link_subscribed(self, conn: LinkConnection) -> None:
        """A SUBACK arrived (refused topics were reported first)."""

    def link_failed(self, error: TransportError) -> None: ...


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes


class LinkConnection:
    """One MQTT connection (one paho client). Thread-safe for publish/subscribe/ack.

    paho-mqtt 2.2 has no lock around its outgoing packet writer
    (``Client._packet_write``: pop a packet, send what the socket takes, put the
    rest back first), and without a network thread of its own (``loop_start``; we
    run the loop on the link thread) ``publish()`` and ``ack()`` write at once on
    the calling thread. Two threads in that writer could interleave the rests of
    partly written packets, and an ``SSLSocket`` must not be read and written by
    two threads at once. So every call into paho that may touch the socket holds
    :attr:`io`: the worker's PUBLISHes and PUBACKs (written at once, on its thread,
    no hand-off) and each round of the link thread's loop (:func:`_loop_once`,
    which waits in ``select()`` without it).
    """

    def __init__(self, number: int, client: mqtt.Client, protocol: str) -> None:
        self.number = number
        self.client = client
        self.protocol = protocol
        self.alias_max = 0
        self.receive_max = 65_535
        self.max_packet = 0  # the broker's Maximum Packet Size (MQTT 5 CONNACK); 0: none
        self.connected = False
        self._aliases: dict[str, int] = {}
        # One PUBLISH properties object per alias, built once: paho only reads it, and
        # building one per message cost about a tenth of the publishing thread's time.
        self._alias_properties: dict[int, Properties] = {}
        self._alias_lock = threading.Lock()
        self._inbound: dict[int, str] = {}  # the broker's aliases (link thread only)
        self.io = threading.Lock()  # taken before _alias_lock, never after it
        self.pending_subscribes: dict[int, list[str]] = {}
        # Set by the device once it sent the SUBSCRIBEs a new connection needs: with no
        # SUBACK pending after that, what is published to us is routed to us.
        self.ready = False

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, alias: bool = False
    ) -> int:
        """Publish with QoS 1; the packet id, matched later by ``link_published``.

        With ``alias`` on an MQTT 5 connection whose broker allows topic aliases, the
        topic travels once and then as a two-byte alias (MQTT 5 §3.3.2.3.4).
        """
        properties = None
        if alias and self.alias_max:
            with self._alias_lock:
                number = self._aliases.get(topic)
                if number is not None:
                    topic_out = ""
                elif len(self._aliases) < self.alias_max:
                    number = self._aliases[topic] = len(self._aliases) + 1
                    topic_out = topic
            if number is not None:
                properties = self._alias_properties.get(number)
                if properties is None:
                    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    properties.TopicAlias = number
                    self._alias_properties[number] = properties
                topic = topic_out
        with self.io:
            info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        return info.mid

    def inbound_topic(self, topic: str, alias: int) -> str | None:
        """The topic of a received PUBLISH that carries a Topic Alias: a name sets the
        alias, an empty name uses it; ``None`` for an alias never set or out of range
        (a protocol error, MQTT 5 §3.3.2.3.4)."""
        if not 0 < alias <= INBOUND_ALIASES:
            return None
        if topic:
            self._inbound[alias] = topic
            return topic
        return self._inbound.get(alias)

    def publish_status(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        with self.io:
            return self.client.publish(topic, payload, qos=1, retain=True)

    def subscribe(self, topics: Sequence[str], *, no_local: Sequence[str] = ()) -> None:
        """Subscribe with QoS 1; ``no_local`` topics do not echo our own publishes (MQTT 5)."""
        local = set(no_local)
        for i in range(0, len(topics), _SUBSCRIBE_CHUNK):
            chunk = list(topics[i : i + _SUBSCRIBE_CHUNK])
            # The SUBACK may arrive before subscribe() returns.
            with self.io, self._alias_lock:
                if self.protocol == "5":
                    _, mid = self.client.subscribe(
                        [(t, SubscribeOptions(qos=1, noLocal=t in local)) for t in chunk]
                    )
                else:
                    _, mid = self.client.subscribe([(t, 1) for t in chunk])
                if mid is not None:
                    self.pending_subscribes[mid] = chunk

    def unsubscribe(self, topics: Sequence[str]) -> None:
        if topics:
            with self.io:
                self.client.unsubscribe(list(topics))

    def ack(self, mid: int) -> None:
        """PUBACK a received message (manual acknowledgement, after it is durable).

        A connection closing meanwhile (paho's sockets already shut) drops the PUBACK:
        the broker delivers the message again, and the device's dedupe absorbs it.
        """
        with self.io, contextlib.suppress(OSError, ValueError):
            self.client.ack(mid, 1)

    def disconnect(self) -> None:
        with self.io:
            self.client.disconnect()


class Link:
    """Keeps one MQTT connection up until :meth:`stop`.

    Args:
        client_id: also the default username: the device's pid.
        will: published by the broker if we vanish (presence).
        protocol: the level remembered by an earlier run (``on_protocol``'s value),
            under ``broker.protocol == "auto"`` (:class:`ProtocolFallback`).
        on_protocol: called with the value to remember when it changes.
    """

    def __init__(
        self,
        client_id: str,
        broker: BrokerOptions,
        options: LinkOptions,
        handler: LinkHandler,
        *,
        will: LastWill | None = None,
        protocol: str | None = None,
        on_protocol: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client_id = client_id
        self.broker = broker
        self.options = options
        self.handler = handler
        self.will = will
        self.levels = ProtocolFallback(broker.protocol, protocol, remember=on_protocol)
        self._rng = rng or random.SystemRandom()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._number = 0
        self.connection: LinkConnection | None = None
        self.farewell: Callable[[LinkConnection], object] | None = None
        self.last_error: TransportError | None = None
        self.connects = 0
        self._address = 0  # index into broker.addresses: where the next CONNECT goes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fieldchat-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (after ``farewell``) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def kick(self) -> None:
        """Drop the current connection (tests, or after a protocol error)."""
        conn = self.connection
        if conn is not None:
            conn.disconnect()

    # -- the link thread --------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The broker address the link uses (or tries next)."""
        return self.broker.addresses[self._address]

    def _run(self) -> None:
        failures = 0
        count = len(self.broker.addresses)
        while not self._stop.is_set():
            outcome = self._connect_once()
            if self._stop.is_set():
                break
            if outcome == "ok":
                failures = 0
            elif outcome == "switch":
                continue  # immediately retry with the other protocol
            else:
                failures += 1
                if count > 1:
                    # Another node at once; the backoff only once all were tried.
                    self._address = (self._address + 1) % count
                    log.info("link: trying %s:%d next", *self.address)
                    if failures % count:
                        continue
            ceiling = min(
                self.options.backoff_max_s, self.options.backoff_min_s * 2 ** min(failures, 20)
            )
            delay = max(0.05, self._rng.uniform(0, ceiling))  # full jitter
            self._stop.wait(delay)

    def _new_client(self, level: str) -> mqtt.Client:
        v5 = level == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        client.max_inflight_messages = 0  # the device windows its outbox itself
        client.connect_timeout = self.options.connect_timeout_s
        username = self.broker.username or self.client_id
        password = self.broker.credential.get_secret_value() if self.broker.credential else None
        client.username_pw_set(username, password)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=1, retain=True)
        tls = self.broker.tls
        if tls is not None:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
        return client

    def _connect_once(self) -> str:  # noqa: PLR0912, PLR0915 - one connection's story
        """One connection from CONNECT to its end: ``ok``, ``fail`` or ``switch``."""
        self._number += 1
        level = self.levels.level()
        client = self._new_client(level)
        conn = LinkConnection(self._number, client, level)
        state: dict[str, Any] = {"connack": None}

        def on_connect(
            _c: mqtt.Client,
            _u: object,
            flags: mqtt.ConnectFlags,
            rc: ReasonCode,
            props: Properties | None,
        ) -> None:
            state["connack"] = rc.value
            if rc.is_failure:
                return
            if props is not None and conn.protocol == "5":
                if self.options.topic_aliases:
                    conn.alias_max = int(getattr(props, "TopicAliasMaximum", 0) or 0)
                conn.receive_max = int(getattr(props, "ReceiveMaximum", 65_535) or 65_535)
                conn.max_packet = int(getattr(props, "MaximumPacketSize", 0) or 0)
            self.levels.after(AttemptOutcome.CONNECTED)
            conn.connected = True
            self.connection = conn
            self.connects += 1
            self.last_error = None
            self.handler.link_connected(conn, flags.session_present)

        def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
            topic = msg.topic
            alias = getattr(msg.properties, "TopicAlias", None) if conn.protocol == "5" else None
            if alias is not None:
                named = conn.inbound_topic(topic, alias)
                if named is None:  # already under conn.io: paho's own disconnect
                    log.warning("link: the broker used topic alias %d, never set", alias)
                    c.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Topic alias invalid"))
                    return
                topic = named
            self.handler.link_message(conn, msg.mid, topic, bytes(msg.payload), msg.qos)

        def on_publish(
            _c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: Properties | None
        ) -> None:
            refusal = PubackRefusal(rc.value, rc.getName()) if rc.is_failure else None
            self.handler.link_published(conn, mid, refusal)

        def on_subscribe(
            _c: mqtt.Client, _u: object, mid: int, codes: list[ReasonCode], _p: Properties | None
        ) -> None:
            with conn._alias_lock:
                topics = conn.pending_subscribes.pop(mid, [])
            refused = [t for t, rc in zip(topics, codes, strict=False) if rc.is_failure]
            if refused:
                self.handler.link_refused(conn, refused)
            self.handler.link_subscribed(conn)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_publish = on_publish
        host, port = self.address
        where = f"{host}:{port}"
        try:
            if conn.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                props.TopicAliasMaximum = INBOUND_ALIASES
                client.connect(
                    host,
                    port,
                    self.options.keepalive_s,
                    clean_start=False,
                    properties=props,
                )
            else:
                client.connect(host, port, self.options.keepalive_s)
        except ssl.SSLError as exc:
            self.levels.after(AttemptOutcome.OTHER)
            return self._fail(ConnectFailed(f"TLS handshake with {where} failed: {exc.reason}"))
        except (TimeoutError, OSError) as exc:
            self.levels.after(AttemptOutcome.OTHER)
            reason = exc.strerror or type(exc).__name__
            return self._fail(ConnectFailed(f"cannot reach broker at {where}: {reason}"))
        _no_delay(client)
        deadline = time.monotonic() + self.options.connect_timeout_s
        reason = "connection lost"
        try:
            while not self._stop.is_set():
                rc = _loop_once(conn, _LOOP_TIMEOUT_S)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    reason = mqtt.error_string(rc)
                    break
                if state["connack"] is None and time.monotonic() > deadline:
                    reason = "no CONNACK in time"
                    break
        except (OSError, ValueError) as exc:  # paho raises ValueError on malformed packets
            reason = str(exc) or type(exc).__name__
        if self._stop.is_set() and conn.connected:
            self._goodbye(conn)
        conn.connected = False
        if self.connection is conn:
            self.connection = None
        _close_client(client)
        connack = state["connack"]
        if connack == 0:
            self.handler.link_disconnected(conn, reason)
            return "ok"
        if self._stop.is_set():
            return "fail"  # stopped while connecting: tells nothing of the broker
        outcome, error = _ending(
            connack, reason, where, level, self.broker.username or self.client_id
        )
        again = self.levels.after(outcome)
        if again:
            log.info("link: MQTT %s next, at once (%s)", self.levels.level(), error)
        self._fail(error)
        return "switch" if again else "fail"

    def _goodbye(self, conn: LinkConnection) -> None:
        """Clean disconnect: farewell publications, then DISCONNECT (no will)."""
        if self.farewell is not None:
            try:
                self.farewell(conn)
                end = time.monotonic() + 1.0
                while time.monotonic() < end and conn.client.want_write():
                    _loop_once(conn, _LOOP_TIMEOUT_S)
                for _ in range(4):
                    _loop_once(conn, _LOOP_TIMEOUT_S)
            except (OSError, ValueError):
                return
        conn.disconnect()
        with contextlib.suppress(OSError, ValueError):
            _loop_once(conn, _LOOP_TIMEOUT_S)

    def _fail(self, error: TransportError) -> str:
        self.last_error = error
        log.info("link: %s", error)
        self.handler.link_failed(error)
        return "fail"


def _ending(
    connack: int | None, reason: str, where: str, level: str, user: str
) -> tuple[AttemptOutcome, TransportError]:
    """What a connection that never got CONNACK 0 tells of the protocol level, and the
    error to report."""
    if connack is None:
        return AttemptOutcome.UNANSWERED, ConnectFailed(
            f"broker at {where} closed the connection ({reason})"
        )
    if connack == _UNSUPPORTED_PROTOCOL:
        return AttemptOutcome.REFUSED_LEVEL, ConnectFailed(
            f"broker at {where} does not speak MQTT {level}"
        )
    if connack in _BAD_CREDENTIALS:
        return AttemptOutcome.OTHER, NotAuthorized(
            f"broker at {where} refused the credential for {user}"
        )
    return AttemptOutcome.OTHER, ConnectFailed(
        f"broker at {where} refused the connection (code {connack})"
    )


def _loop_once(conn: LinkConnection, timeout: float) -> MQTTErrorCode:
    """One round of paho's ``Client.loop()``, with the socket's I/O under ``conn.io``.

    paho's documented external-loop use (``socket()``, ``want_write()``,
    ``loop_read()``, ``loop_write()``, ``loop_misc()``): the wait in ``select()``
    holds no lock, so the worker writes its PUBLISHes and PUBACKs meanwhile on its own
    thread; reading, writing and keep-alive then run under the lock those writes
    take too (see :class:`LinkConnection`).
    """
    client = conn.client
    sock = client.socket()
    if sock is None:
        return MQTTErrorCode.MQTT_ERR_NO_CONN
    with conn.io:
        want = client.want_write()
    # Bytes OpenSSL already decrypted do not make the socket readable again.
    pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
    try:
        readable, _, _ = select.select(
            [sock], [sock] if want else [], [], 0 if pending else timeout
        )
    except (OSError, ValueError, TypeError):  # closed meanwhile (a disconnect)
        return MQTTErrorCode.MQTT_ERR_CONN_LOST
    with conn.io:
        if readable or pending:
            rc = client.loop_read()
            if rc or client.socket() is None:
                return rc
        if client.want_write():
            rc = client.loop_write()
            if rc or client.socket() is None:
                return rc
        return client.loop_misc()


def _no_delay(client: mqtt.Client) -> None:
    """Send each packet at once (TCP_NODELAY; paho leaves Nagle's algorithm on).

    With Nagle, a PUBLISH written while an earlier small packet of ours (a PUBACK) is
    unacknowledged waits for the broker's delayed ACK: up to 40 ms on Linux. On MQTT
    3.1.1 every own message comes back and is PUBACKed, so nearly every send waited
    (median 17 ms here, instead of 0.7 ms); on MQTT 5, a send after PUBACKing a
    receipt did.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close_client(client: mqtt.Client) -> None:
    """Close paho's socket pair and socket (paho leaves them to the garbage collector)."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
    for name in ("_sockpairR", "_sockpairW"):
        pair = getattr(client, name, None)
        if pair is not None:
            with contextlib.suppress(OSError):
                pair.close()
