"""Conformance tests, one per normative statement of MQTT 5 (and 3.1.1 where it shares
it) that the embedded broker implements, named by its id. Each runs against our
broker and, where the statement applies to it as configured, against Mosquitto with
our generated configuration as the reference (``both``)."""

from __future__ import annotations

import time

import pytest

from fieldchat.schemas import mqtt
from fieldchat.schemas.topics import Topics
from tests.broker._cases import BOB, CAROL, X
from tests.broker._reference import Reference

T = Topics()
R = mqtt.ReasonCode
MSG = T.msg(X)


@pytest.fixture(params=["ours", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def both(request, tmp_path):
    ref = Reference(request.param, tmp_path)
    yield ref
    ref.close()


@pytest.fixture
def ours(tmp_path):
    ref = Reference("ours", tmp_path)
    yield ref
    ref.close()


# CONNECT and CONNACK -----------------------------------------------------------------


@pytest.mark.parametrize("level", [3, 6])
def test_MQTT_3_1_2_2_unsupported_protocol_level(both, level):
    # A CONNECT of a level we do not speak gets CONNACK 0x01 and a close, even when the
    # rest of it is laid out as no 3.1.1 CONNECT is (properties of a future level).
    if level == 3 and both.kind == "mosquitto":
        pytest.skip("Mosquitto speaks MQTT 3.1 (MQIsdp); we do not")
    name = b"MQIsdp" if level == 3 else b"MQTT"
    body = len(name).to_bytes(2, "big") + name + bytes([level, 0x02, 0, 60, 3, 0x21, 0, 10])
    body += b"\x00\x01c"
    client = both.raw(4)
    client.sock.sendall(b"\x10" + bytes([len(body)]) + body)
    assert client.read() == mqtt.Connack(False, 0x01)
    assert client.closed()[0]


def test_MQTT_3_1_2_2_mqtt5_connect_is_answered(both):
    user, password = both.creds["alice"]
    connack = both.raw(5).connect(user, user, password)
    assert connack.reason_code == R.SUCCESS


def test_MQTT_3_2_2_3_connack_announces_our_limits(ours):
    user, password = ours.creds["alice"]
    connack = ours.raw(5).connect(user, user, password)
    assert connack.properties.maximum_packet_size == 131_072
    assert connack.properties.topic_alias_maximum == 32


def test_MQTT_3_2_2_16_assigned_client_identifier(ours):
    user, password = ours.creds["alice"]
    connack = ours.raw(5).connect("", user, password)
    assert connack.reason_code == R.SUCCESS
    assert connack.properties.assigned_client_identifier == user
    assert ours.raw(4).connect("", user, password).reason_code == 0x02  # 3.1.1: refused


def test_MQTT_3_2_2_21_server_keep_alive(tmp_path):
    ref = Reference("ours", tmp_path, max_keepalive_s=30)
    try:
        user, password = ref.creds["alice"]
        assert (
            ref.raw(5).connect(user, user, password, keep_alive=0).properties.server_keep_alive
            == 30
        )
        assert (
            ref.raw(5).connect(user, user, password, keep_alive=10).properties.server_keep_alive
            is None
        )
    finally:
        ref.close()


def test_MQTT_3_1_2_bad_authentication_method(both):
    user, password = both.creds["alice"]
    client = both.raw(5)
    connack = client.connect(user, user, password, authentication_method="SCRAM-SHA-1")
    assert connack.reason_code == R.BAD_AUTHENTICATION_METHOD


def test_MQTT_3_2_2_7_a_refused_connect_gets_a_reason_and_a_close(both):
    user, _ = both.creds["alice"]
    client = both.raw(5)
    code = client.connect(user, user, "wrong").reason_code
    # ours says which (0x86); Mosquitto answers 0x87 Not authorized, also allowed
    assert code == R.BAD_USER_NAME_OR_PASSWORD if both.kind == "ours" else code >= 0x80
    assert client.closed()[0]


def test_MQTT_3_1_4_3_takeover_disconnects_the_old_connection_with_0x8e(both):
    old = both.client("bob", clean=False, session_expiry_interval=60)
    both.client("bob", clean=False, session_expiry_interval=60)
    closed, disconnect = old.closed()
    assert closed
    if both.kind == "ours":  # a MAY (MQTT 5 §4.13); Mosquitto 2.0.11 just closes
        assert disconnect == mqtt.Disconnect(R.SESSION_TAKEN_OVER)


# sessions -------------------------------------------------------------------------------


def test_MQTT_3_1_2_23_session_kept_for_its_expiry_interval(both):
    bob = both.client("bob", clean=False, session_expiry_interval=60)
    assert bob.subscribe(MSG) == (1,)
    bob.disconnect()
    alice = both.client("alice")
    assert alice.publish(MSG, b"queued").reason_code < 0x80
    bob = both.raw(5)
    user, password = both.creds["bob"]
    connack = bob.connect(user, user, password, clean=False, session_expiry_interval=60)
    assert connack.session_present
    assert [m.payload for m in bob.messages(1)] == [b"queued"]


def test_MQTT_4_1_0_2_session_ends_when_its_expiry_interval_passes(both):
    bob = both.client("bob", clean=False, session_expiry_interval=1)
    assert bob.subscribe(MSG) == (1,)
    bob.disconnect()
    alice = both.client("alice")
    assert alice.publish(MSG, b"to be freed").reason_code < 0x80
    time.sleep(2.2)
    user, password = both.creds["bob"]
    connack = both.raw(5).connect(user, user, password, clean=False)
    assert not connack.session_present


def test_MQTT_3_1_2_session_expiry_0_ends_with_the_connection(both):
    bob = both.client("bob", clean=False)  # MQTT 5 default: Session Expiry Interval 0
    assert bob.subscribe(MSG) == (1,)
    bob.disconnect()
    user, password = both.creds["bob"]
    assert not both.raw(5).connect(user, user, password, clean=False).session_present


def test_MQTT_3_3_1_1_inflight_redelivered_with_dup_after_a_restart(ours):
    for level in (4, 5):
        bob = ours.client("bob", level=level, clean=False, session_expiry_interval=600)
        assert bob.subscribe(MSG) == (1,)
        alice = ours.client("alice", level=level)
        for i in range(3):
            assert alice.publish(MSG, b"m%d" % i, packet_id=i + 1).reason_code < 0x80
        first = bob.messages(3, ack=False)  # received, never acknowledged
        assert [(m.payload, m.dup) for m in first] == [(b"m%d" % i, False) for i in range(3)]
        bob.close()
        alice.close()
        ours.restart()
        bob = ours.client("bob", level=level, clean=False, session_expiry_interval=600)
        again = bob.messages(3)
        assert [(m.payload, m.dup) for m in again] == [(b"m%d" % i, True) for i in range(3)]
        assert [m.packet_id for m in again] == [m.packet_id for m in first]  # MQTT-4.4.0-1
        bob.disconnect()


def test_MQTT_4_3_3_10_qos2_resent_after_a_reconnect_is_delivered_once(both):
    for level in (4, 5):
        bob = both.client("bob", level=level)
        assert bob.subscribe(MSG) == (1,)
        alice = both.client("alice", level=level, clean=False, session_expiry_interval=60)
        assert alice.publish(MSG, b"once", qos=2, packet_id=7) == mqtt.Pubrec(7)
        alice.close()  # no PUBREL: the link dropped
        alice = both.client("alice", level=level, clean=False, session_expiry_interval=60)
        assert alice.publish(MSG, b"once", qos=2, packet_id=7, dup=True) == mqtt.Pubrec(7)
        alice.send(mqtt.Pubrel(7))
        assert alice.read() == mqtt.Pubcomp(7)
        assert [m.payload for m in bob.quiet(0.8)] == [b"once"]
        alice.disconnect()
        bob.disconnect()


# PUBLISH ----------------------------------------------------------------------------


def test_MQTT_3_4_2_not_a_member_gets_a_negative_puback(ours):
    carol = ours.client("carol")
    assert carol.publish(MSG, b"not mine") == mqtt.Puback(1, R.NOT_AUTHORIZED)
    assert carol.publish(T.inbox(BOB.pid), b"still connected", packet_id=2) == mqtt.Puback(2)


def test_MQTT_3_3_2_wildcard_topic_name_is_refused_with_0x90(ours):
    carol = ours.client("carol")
    carol.send(mqtt.Publish(T.all_msgs(), b"x", 1, packet_id=1))
    closed, disconnect = carol.closed()
    assert closed
    assert disconnect == mqtt.Disconnect(R.TOPIC_NAME_INVALID)


def test_MQTT_3_3_2_12_topic_aliases_from_the_client_are_accepted(both):
    bob = both.client("bob")
    assert bob.subscribe(MSG) == (1,)
    alice = both.client("alice")
    assert alice.publish(MSG, b"one", topic_alias=1).reason_code < 0x80
    assert alice.publish("", b"two", packet_id=2, topic_alias=1).reason_code < 0x80
    assert [(m.topic, m.payload) for m in bob.messages(2)] == [(MSG, b"one"), (MSG, b"two")]


def test_MQTT_3_3_2_8_topic_alias_0_or_unset_is_an_error(both):
    alice = both.client("alice")
    alice.send(mqtt.Publish("", b"x", 1, packet_id=1, properties=mqtt.Properties(topic_alias=5)))
    assert alice.closed()[0]


def test_MQTT_3_3_2_11_server_aliases_stay_within_the_client_maximum(ours):
    bob = ours.client("bob", topic_alias_maximum=1)
    assert bob.subscribe(MSG) == (1,)
    assert bob.subscribe(T.inbox(BOB.pid)) == (1,)
    alice = ours.client("alice")
    for i, topic in enumerate([MSG, MSG, T.inbox(BOB.pid), T.inbox(BOB.pid)], 1):
        alice.publish(topic, b"%d" % i, packet_id=i)
    got = bob.messages(4)
    assert [(m.topic, m.properties.topic_alias) for m in got] == [
        (MSG, 1),
        ("", 1),  # known: the alias alone, 38 bytes saved
        (T.inbox(BOB.pid), None),  # beyond the client's maximum: in full
        (T.inbox(BOB.pid), None),
    ]


def test_MQTT_3_8_3_3_no_local(both):
    alice = both.client("alice")
    assert alice.subscribe(MSG, no_local=True) == (1,)
    bob = both.client("bob")
    assert bob.subscribe(MSG) == (1,)
    assert alice.publish(MSG, b"mine").reason_code < 0x80
    assert [m.payload for m in bob.messages(1)] == [b"mine"]
    assert alice.quiet(0.5) == []


def test_MQTT_3_3_1_12_and_13_retain_as_published(both):
    gateway = both.client("gateway")
    assert gateway.subscribe(T.status(BOB.pid), retain_as_published=False) == (1,)
    observer = both.client("observer")
    assert observer.subscribe(T.status(BOB.pid), retain_as_published=True) == (1,)
    bob = both.client("bob")
    assert bob.publish(T.status(BOB.pid), b"online", retain=True).reason_code < 0x80
    assert [m.retain for m in gateway.messages(1)] == [False]
    assert [m.retain for m in observer.messages(1)] == [True]


@pytest.mark.parametrize(
    ("handling", "first", "again"),
    [
        (mqtt.RetainHandling.SEND_ON_SUBSCRIBE, 1, 1),  # MQTT-3.3.1-9
        (mqtt.RetainHandling.SEND_IF_NEW, 1, 0),  # MQTT-3.3.1-10
        (mqtt.RetainHandling.DO_NOT_SEND, 0, 0),  # MQTT-3.3.1-11
    ],
)
def test_MQTT_3_3_1_9_to_11_retain_handling(both, handling, first, again):
    bob = both.client("bob")
    assert bob.publish(T.status(BOB.pid), b"online", retain=True).reason_code < 0x80
    alice = both.client("alice")
    assert alice.subscribe(T.status(BOB.pid), retain_handling=handling) == (1,)
    assert len(alice.quiet(0.5)) == first
    assert alice.subscribe(T.status(BOB.pid), retain_handling=handling) == (1,)
    assert len(alice.quiet(0.5)) == again


def test_MQTT_3_3_2_5_and_6_message_expiry(both):
    bob = both.client("bob", clean=False, session_expiry_interval=60)
    assert bob.subscribe(MSG) == (1,)
    bob.disconnect()
    alice = both.client("alice")
    assert alice.publish(MSG, b"short", message_expiry_interval=1).reason_code < 0x80
    assert alice.publish(MSG, b"long", packet_id=2, message_expiry_interval=60).reason_code < 0x80
    time.sleep(2.1)
    bob = both.client("bob", clean=False, session_expiry_interval=60)
    got = bob.messages(2, timeout=1.5)
    assert [m.payload for m in got] == [b"long"]  # MQTT-3.3.2-5: the expired one is gone
    assert 50 <= got[0].properties.message_expiry_interval <= 58  # MQTT-3.3.2-6: what remains


def test_MQTT_3_3_4_9_receive_maximum_of_the_client(both):
    bob = both.client("bob", clean=False, session_expiry_interval=60, receive_maximum=3)
    assert bob.subscribe(MSG) == (1,)
    alice = both.client("alice")
    for i in range(8):
        assert alice.publish(MSG, b"%d" % i, packet_id=i + 1).reason_code < 0x80
    first = bob.quiet(0.8, ack=False)
    assert len(first) == 3
    for message in first:
        bob.send(mqtt.Puback(message.packet_id))
    assert len(bob.messages(5)) == 5


def test_MQTT_3_1_2_25_nothing_above_the_client_maximum_packet_size(both):
    bob = both.client("bob", maximum_packet_size=200)
    assert bob.subscribe(MSG) == (1,)
    alice = both.client("alice")
    assert alice.publish(MSG, b"x" * 500).reason_code < 0x80
    assert alice.publish(MSG, b"small", packet_id=2).reason_code < 0x80
    assert [m.payload for m in bob.messages(2, timeout=1.5)] == [b"small"]


def test_MQTT_3_2_2_15_a_packet_above_our_maximum_is_refused(both):
    alice = both.client("alice")
    alice.send(mqtt.Publish(MSG, b"x" * 300_000, 1, packet_id=1))
    assert alice.closed()[0]


def test_MQTT_3_3_4_3_subscription_identifiers_are_forwarded(both):
    gateway = both.client("gateway")
    assert gateway.subscribe(T.all_msgs(), identifier=7) == (1,)
    assert gateway.subscribe(MSG, identifier=9) == (1,)
    alice = both.client("alice")
    assert alice.publish(MSG, b"x").reason_code < 0x80
    # one copy with both (ours) or one copy per subscription (Mosquitto), MQTT-3.3.4-4, -5
    got = gateway.quiet(0.6)
    assert sorted(i for m in got for i in m.properties.subscription_identifiers) == [7, 9]


def test_MQTT_3_3_2_response_topic_and_correlation_data_are_forwarded(both):
    bob = both.client("bob")
    assert bob.subscribe(MSG) == (1,)
    alice = both.client("alice")
    reply = T.inbox(CAROL.pid)
    assert (
        alice.publish(MSG, b"q", response_topic=reply, correlation_data=b"\x01").reason_code < 0x80
    )
    [message] = bob.messages(1)
    assert (message.properties.response_topic, message.properties.correlation_data) == (
        reply,
        b"\x01",
    )


def test_MQTT_3_1_2_request_response_information_names_the_inbox(ours):
    user, password = ours.creds["alice"]
    connack = ours.raw(5).connect(user, user, password, request_response_information=1)
    assert connack.properties.response_information == T.inbox(user)


def test_MQTT_3_1_3_9_will_delay(both):
    watcher = both.client("alice")
    assert watcher.subscribe(T.status(BOB.pid)) == (1,)
    will = mqtt.Will(T.status(BOB.pid), b"gone", 1, False, mqtt.Properties(will_delay_interval=1))
    bob = both.client("bob", clean=False, session_expiry_interval=60, will=will)
    bob.close()  # no DISCONNECT: the will is due, after its delay
    assert watcher.quiet(0.5) == []
    assert [m.payload for m in watcher.messages(1, timeout=3)] == [b"gone"]
    # reconnecting within the delay cancels it
    bob = both.client("bob", clean=False, session_expiry_interval=60, will=will)
    bob.close()
    both.client("bob", clean=False, session_expiry_interval=60).close()
    assert watcher.quiet(1.6) == []


def test_MQTT_3_14_2_disconnect_with_will_message(both):
    watcher = both.client("alice")
    assert watcher.subscribe(T.status(BOB.pid)) == (1,)
    bob = both.client("bob", will=mqtt.Will(T.status(BOB.pid), b"bye", 1))
    bob.disconnect(R.DISCONNECT_WITH_WILL)
    assert [m.payload for m in watcher.messages(1)] == [b"bye"]


# SUBSCRIBE and UNSUBSCRIBE ---------------------------------------------------------------


def test_MQTT_3_9_3_refused_subscriptions_say_why(ours):
    carol = ours.client("carol")
    assert carol.subscribe(MSG) == (R.NOT_AUTHORIZED,)
    assert carol.subscribe("fc/v1/c/a+/msg") == (R.TOPIC_FILTER_INVALID,)


def test_MQTT_3_11_3_unsuback_reason_codes(both):
    bob = both.client("bob")
    assert bob.subscribe(MSG) == (1,)
    bob.send(mqtt.Unsubscribe(2, (MSG, T.inbox(BOB.pid))))
    assert bob.read() == mqtt.Unsuback(2, (R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED))


def test_MQTT_4_8_2_shared_subscriptions_share_the_messages(both):
    shared = f"$share/archive/{T.all_msgs()}"
    gateways = [both.client("gateway"), both.client("observer")]
    for gateway in gateways:
        assert gateway.subscribe(shared) == (1,)
    alice = both.client("alice")
    for i in range(10):
        assert alice.publish(MSG, b"%d" % i, packet_id=i + 1).reason_code < 0x80
    got = [m.payload for gateway in gateways for m in gateway.quiet(0.8)]
    assert sorted(got) == sorted(b"%d" % i for i in range(10))  # each once, to one of them


def test_MQTT_3_8_3_4_no_local_on_a_shared_subscription_is_a_protocol_error(both):
    gateway = both.client("gateway")
    gateway.send(
        mqtt.Subscribe(1, (mqtt.Subscription(f"$share/g/{T.all_msgs()}", 1, no_local=True),))
    )
    assert gateway.closed()[0]


def test_MQTT_3_15_auth_packets_are_refused(ours):
    alice = ours.client("alice")
    alice.send(mqtt.Auth(R.CONTINUE_AUTHENTICATION))
    closed, disconnect = alice.closed()
    assert closed
    assert disconnect == mqtt.Disconnect(R.BAD_AUTHENTICATION_METHOD)
