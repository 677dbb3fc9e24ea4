"""Real MQTT 5 clients on the embedded broker: paho (``protocol=MQTTv5``) and aiomqtt
connect, publish, subscribe, and resume their sessions (issue 17)."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, ROSTER_X, X
from tests.broker._peers import Peer

T = Topics()


def test_paho_mqtt5_connects_publishes_subscribes_and_resumes(broker_thread, peers):
    alice_password = broker_thread.enroll(ALICE.pid)
    bob_password = broker_thread.enroll(BOB.pid)

    def peer(pid: str, password: str, *, clean: bool = True) -> Peer:
        made = Peer(broker_thread.port, pid, password, clean=clean, protocol=paho.MQTTv5)
        peers.append(made)
        return made

    alice = peer(ALICE.pid, alice_password)
    alice.connect()
    assert alice.publish(T.roster(X), ROSTER_X.to_bytes(), retain=True)
    bob = peer(BOB.pid, bob_password, clean=False)
    bob.connect()
    assert bob.subscribe(T.msg(X)) == 1
    assert alice.publish(T.msg(X), b"live")
    assert [m.payload for m in bob.expect(1)] == [b"live"]
    bob.disconnect()
    assert alice.publish(T.msg(X), b"while away")
    bob = peer(BOB.pid, bob_password, clean=False)
    _, _, present = bob.connect()
    assert present
    assert [m.payload for m in bob.expect(1)] == [b"while away"]


async def test_aiomqtt_mqtt5_connects_publishes_subscribes_and_resumes(embedded_broker):
    broker = embedded_broker
    credentials = {p.pid: broker.enroll(p.pid) for p in (ALICE, BOB)}

    def client(pid: str, *, clean: bool = True) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if clean else 600
        return aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier=pid,
            username=pid,
            password=credentials[pid],
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=clean,
            properties=properties,
        )

    async with asyncio.timeout(20), client(ALICE.pid) as alice:
        await alice.publish(T.roster(X), ROSTER_X.to_bytes(), qos=1, retain=True)
        async with client(BOB.pid, clean=False) as bob:
            await bob.subscribe(T.msg(X), qos=1)
            await alice.publish(T.msg(X), b"live", qos=1)
            async for message in bob.messages:
                assert message.payload == b"live"
                break
        await alice.publish(T.msg(X), b"while away", qos=1)
    async with asyncio.timeout(20), client(BOB.pid, clean=False) as bob:
        async for message in bob.messages:
            assert (message.topic.value, message.payload) == (T.msg(X), b"while away")
            break
