"""The roster verifier of a Mosquitto deployment, for the device tests.

Members publish new rosters on ``c/{cid}/propose``; on brokers that cannot check
signatures (Mosquitto, NATS) the gateway verifies each chain and retains it on
``c/{cid}/roster`` (schemas.topics). The device tests run Mosquitto without a gateway,
so this plays that part with the same rule (``fieldchat.schemas.verify_roster_chain``): a
proposal is retained only when it extends the last roster retained for its
conversation, from epoch 0. It speaks real MQTT to the real broker.
"""

from __future__ import annotations

import os
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fieldchat.schemas import FieldchatError, Roster, verify_roster_chain

# Proposal filters for topic prefixes of one to three levels ("fc/v1" in the tests).
_FILTERS = [("/".join(["+"] * n) + "/c/+/propose", 1) for n in (1, 2, 3)]


class RosterVerifier:
    """Subscribes to proposals on ``127.0.0.1:port`` and retains those that chain."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.port = port
        self.retained: dict[str, Roster] = {}
        self.refused = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"verifier-{os.urandom(4).hex()}",
            clean_session=False,  # proposals made while the broker restarts still come
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        # paho annotates these as int; it only compares and sleeps them, so floats work.
        self.client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]

    def start(self) -> RosterVerifier:
        self.client.connect_async("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe(_FILTERS)

    def _on_message(self, client: mqtt.Client, _: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            try:
                roster = Roster.from_bytes(bytes(message.payload))
                known = self.retained.get(roster.cid)
                if known is not None and known.digest() == roster.digest():
                    return  # proposed again: retained already
                verify_roster_chain(roster, known)
            except FieldchatError:
                self.refused += 1
                return
            self.retained[roster.cid] = roster
        topic = message.topic.rsplit("/", 1)[0] + "/roster"
        client.publish(topic, message.payload, qos=1, retain=True)
