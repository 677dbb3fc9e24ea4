"""The archiver's own MQTT client: packets split anywhere by TCP still parse, a broken
stream closes the connection instead of crashing the loop, and against real Mosquitto
(3.1.1 and 5) nothing unacknowledged is lost across a reconnect."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import pytest

from fieldchat.broker.testing import broker_config, embedded_broker, participant  # noqa: F401
from fieldchat.gateway._mqtt import Delivered, MqttClient, _Protocol
from fieldchat.schemas.errors import ConnectFailed

pytestmark = pytest.mark.mosquitto


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _publish_packet(topic: str, payload: bytes, mid: int, *, v5: bool) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + mid.to_bytes(2, "big")
    if v5:
        body += b"\x02\x01\x01"  # properties (2 bytes): Payload Format Indicator = 1
    body += payload
    size = len(body)
    length = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([0x32]) + bytes(length) + body


@pytest.mark.parametrize("v5", [False, True])
def test_publish_packets_split_anywhere_parse_in_order(v5):
    client = MqttClient("127.0.0.1", 1, client_id="t", protocol="5" if v5 else "3.1.1")
    protocol = _Protocol(client)
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    payloads = [bytes([i]) * (i * 37 % 300) for i in range(1, 40)]  # sizes cross 127 and 0
    stream = b"".join(
        _publish_packet(f"fc/v1/c/x{i}/msg", p, i, v5=v5) for i, p in enumerate(payloads, 1)
    )
    for cut in range(0, len(stream), 7):  # 7-byte pieces split headers and lengths
        protocol.data_received(stream[cut : cut + 7])
    got = client.take(1000)
    assert [m.payload for m in got] == payloads
    assert [m.mid for m in got] == list(range(1, 40))
    assert got[0] == Delivered("fc/v1/c/x1/msg", payloads[0], 1, 1, False)


def test_a_malformed_stream_closes_the_connection():
    client = MqttClient("127.0.0.1", 1, client_id="t")
    protocol = _Protocol(client)
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(bytes([0x32, 3, 0, 9, 0]))  # topic longer than the packet
    assert transport.aborted
    protocol.data_received(bytes([0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))  # 5-byte length
    assert client.take(10) == []


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_unacknowledged_messages_come_back_after_a_reconnect(mosquitto, prefix, protocol):
    client_id = f"t-{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}/c/x/msg"

    async def session() -> MqttClient:
        client = MqttClient(
            "127.0.0.1",
            mosquitto.port,
            client_id=client_id,
            protocol=protocol,
            session_expiry_s=60,
        )
        await client.connect()
        await client.subscribe([(topic, 1)])
        return client

    async def receive(client: MqttClient, n: int) -> list[Delivered]:
        got: list[Delivered] = []
        async with asyncio.timeout(20):
            while len(got) < n:
                if await client.wait(5):
                    got += client.take(n - len(got))
        return got

    client = await session()
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as publisher:
        for i in range(10):
            await publisher.publish(topic, f"m{i}".encode(), qos=1)
    first = await receive(client, 10)
    client.ack(first[:4])  # the first four are committed; the rest are not
    await client.publish(topic, b"own", timeout=10)  # QoS 1, waits for the PUBACK
    await asyncio.sleep(0.3)
    await client.close()
    client = await session()  # same id: the persistent session redelivers
    try:
        again = await receive(client, 7)
        assert {m.payload for m in again} == {f"m{i}".encode() for i in range(4, 10)} | {b"own"}
        client.ack(again)
    finally:
        await client.close()


async def test_mqtt5_falls_back_to_311_on_a_broker_that_refuses_it():
    # Stock aMQTT 0.12.1 speaks 3.1.1 only: the client asked for 5 connects with 3.1.1.
    from tests.broker._stock import StockThread

    stock = StockThread()
    stock.start()
    try:
        user, password = stock.add_gateway("fallback")
        client = MqttClient(
            "127.0.0.1",
            stock.port,
            client_id=user,
            username=user,
            password=password,
            protocol="5",
            fallback_311=True,
        )
        await client.connect()
        try:
            assert not client.v5
            await client.subscribe([("fc/v1/p/+/status", 1)])
            await client.publish(f"fc/v1/p/{participant(2).pid}/status", b"up", timeout=5)
            assert await client.wait(5)
            assert [m.payload for m in client.take(10)] == [b"up"]
        finally:
            await client.close()
    finally:
        stock.stop()


async def test_connack_limits_are_honoured(embedded_broker):  # noqa: F811
    # The embedded broker announces its Maximum Packet Size and Topic Alias Maximum;
    # the client names a topic by its alias after the first publish and refuses,
    # before sending, a publish the broker would refuse.
    user, password = embedded_broker.add_gateway("limits")
    client = MqttClient(
        "127.0.0.1", embedded_broker.port, client_id=user, username=user, password=password
    )
    await client.connect()
    try:
        assert client.broker_max_packet_size == embedded_broker.config.limits.max_packet_bytes
        topic = f"fc/v1/p/{participant(2).pid}/inbox"
        await client.subscribe([(topic, 1)])
        for payload in (b"one", b"two"):
            await client.publish(topic, payload, timeout=5)
        assert client._aliases.alias(topic) == (1, True)  # the second went as alias 1
        got: list[Delivered] = []
        async with asyncio.timeout(5):
            while len(got) < 2:
                await client.wait(5)
                got += client.take(10)
        assert [(m.topic, m.payload) for m in got] == [(topic, b"one"), (topic, b"two")]
        with pytest.raises(ConnectFailed):
            await client.publish(topic, b"x" * 200_000, timeout=5)
    finally:
        await client.close()
