"""The embedded MQTT 3.1.1 and 5 broker (ours; aMQTT 0.12.1 makes its TLS context) and
generated Mosquitto configuration.

Usage, asynchronous (the gateway's tests)::

    from fieldchat.broker import BrokerConfig, EmbeddedBroker

    config = BrokerConfig(data_dir=tmp_path, port=0)          # 0: an ephemeral port
    async with EmbeddedBroker(config) as broker:
        credential = broker.enroll(pid)                       # print once; stored hashed
        gw_user, gw_credential = broker.add_gateway("archive-1")
        # connect with MQTT 3.1.1: username = client id = pid (or gw_user)
        aiomqtt.Client("127.0.0.1", broker.port, identifier=pid, username=pid,
                       password=credential, protocol=aiomqtt.ProtocolVersion.V311)

Usage, synchronous (paho-mqtt tests)::

    from fieldchat.broker import BrokerThread

    with BrokerThread(BrokerConfig(data_dir=tmp_path, port=0)) as broker:
        credential = broker.enroll(pid)
        client.connect("127.0.0.1", broker.port)

Pytest fixtures: ``from broker.testing import *`` in a ``conftest.py`` gives
``broker_config``, ``broker_thread``, ``embedded_broker`` and ``mqtt_account``
(see :mod:`fieldchat.broker.testing`).

Rules: participants log in with username = client id = pid and the credential from
``enroll``; gateways with ``gw-<name>``. Per-topic ACL as in :mod:`fieldchat.broker._acl`
(conversation membership learned from the signed rosters relayed on
``c/{cid}/roster``, with ``allow``/``deny`` overrides). MQTT 3.1.1 and 5 are spoken;
QoS 2 subscriptions are granted QoS 1. See ``docs/broker.md``.
"""

from fieldchat.broker._acl import Deny, Membership, Principal, Rules
from fieldchat.broker._config import BrokerConfig, Limits, TlsConfig
from fieldchat.broker._errors import (
    BrokerError,
    MalformedPacket,
    PacketTooLarge,
    PortInUse,
    UnknownAccount,
)
from fieldchat.broker._metrics import BrokerMetrics
from fieldchat.broker._server import EmbeddedBroker
from fieldchat.broker._store import Store, gateway_username
from fieldchat.broker._thread import BrokerThread

__all__ = [
    "BrokerConfig",
    "BrokerError",
    "BrokerMetrics",
    "BrokerThread",
    "Deny",
    "EmbeddedBroker",
    "Limits",
    "MalformedPacket",
    "Membership",
    "PacketTooLarge",
    "PortInUse",
    "Principal",
    "Rules",
    "Store",
    "TlsConfig",
    "UnknownAccount",
    "gateway_username",
]
