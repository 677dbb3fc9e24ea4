"""TLS and WebSocket listeners, metrics, the CLI, and authentication details."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import urllib.request

import pytest
from typer.testing import CliRunner

from fieldchat.broker import BrokerConfig, BrokerThread, EmbeddedBroker, PortInUse, TlsConfig
from fieldchat.broker.testing import make_config
from fieldchat.cli import app
from fieldchat.schemas.topics import Topics
from tests._tls import self_signed
from tests.broker._cases import ALICE, BOB
from tests.broker._peers import Peer

T = Topics()


@pytest.fixture
def certificate(tmp_path):
    return self_signed(tmp_path)


def _roundtrip(port_pub, port_sub, creds, **sub_kw):
    alice = Peer(port_sub, ALICE.pid, creds[ALICE.pid], **sub_kw)
    bob = Peer(port_pub, BOB.pid, creds[BOB.pid])
    try:
        alice.connect()
        assert alice.subscribe(T.inbox(ALICE.pid)) == 1
        bob.connect()
        assert bob.publish(T.inbox(ALICE.pid), b"\x00\x01\xff over the wire")
        assert [m.payload for m in alice.expect(1)] == [b"\x00\x01\xff over the wire"]
    finally:
        alice.close()
        bob.close()


def test_tls_and_websocket_listeners(tmp_path, certificate):
    certfile, keyfile = certificate
    config = make_config(tmp_path / "broker").model_copy(
        update={"tls": TlsConfig(certfile=certfile, keyfile=keyfile, port=0), "ws_port": 0}
    )
    with BrokerThread(config) as broker:
        creds = {ALICE.pid: broker.enroll(ALICE.pid), BOB.pid: broker.enroll(BOB.pid)}
        tls_port, ws_port = broker.broker.tls_port, broker.broker.ws_port
        assert tls_port and ws_port
        _roundtrip(broker.port, tls_port, creds, tls={"ca_certs": str(certfile)})
        _roundtrip(broker.port, ws_port, creds, transport="websockets")
        with socket.create_connection(("127.0.0.1", tls_port)) as raw:  # plain TCP on TLS
            raw.settimeout(5)
            raw.sendall(b"\x10\x00")
            assert raw.recv(100)[:1] in (b"\x15", b"")  # a TLS alert or a close


def test_metrics_endpoint(tmp_path):
    config = make_config(tmp_path / "broker").model_copy(update={"metrics_port": 0})
    with BrokerThread(config) as broker:
        creds = {ALICE.pid: broker.enroll(ALICE.pid), BOB.pid: broker.enroll(BOB.pid)}
        _roundtrip(broker.port, broker.port, creds)
        refused = Peer(broker.port, ALICE.pid, "wrong")
        assert not refused.connect(expect_ok=False)[0]
        refused.close()
        url = f"http://127.0.0.1:{broker.broker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
            text = response.read().decode()
    assert "fieldchat_broker_messages_in_total 1.0" in text
    assert "fieldchat_broker_messages_out_total 1.0" in text
    assert 'fieldchat_broker_denials_total{reason="auth"} 1.0' in text
    assert "fieldchat_broker_connected_clients" in text
    assert "fieldchat_broker_queued_messages 0.0" in text


async def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = BrokerConfig(data_dir=tmp_path / "broker", port=port, ws_port=0)
        with pytest.raises(PortInUse, match="--port"):
            async with EmbeddedBroker(config):
                pass


def test_cli_port_in_use_exits_non_zero(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fieldchat.cli import app; app()",
                "broker",
                "run",
                "--data-dir",
                str(tmp_path / "b"),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "--port" in result.stderr


def test_cli_enroll_prints_the_credential_once_and_stores_a_hash(tmp_path):
    runner = CliRunner()
    data = tmp_path / "broker"
    result = runner.invoke(app, ["broker", "enroll", ALICE.pid, "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    credential = result.output.strip()
    assert len(credential) >= 43
    db = (data / "broker.sqlite3").read_bytes()
    assert credential.encode() not in db
    assert (data / "broker.sqlite3").stat().st_mode & 0o777 == 0o600
    bad = runner.invoke(app, ["broker", "enroll", "not-a-pid", "--data-dir", str(data)])
    assert bad.exit_code == 1
    out = tmp_path / "mosquitto"
    result = runner.invoke(
        app,
        [
            "broker",
            "mosquitto-config",
            "--out",
            str(out),
            "--data-dir",
            str(data),
            "--port",
            "18883",
        ],
    )
    assert result.exit_code == 0, result.output
    assert ALICE.pid in (out / "passwd").read_text()
    assert credential not in (out / "passwd").read_text()


def test_client_id_must_equal_username_and_secrets_stay_out_of_logs(broker_thread, caplog):
    caplog.set_level(logging.DEBUG)
    credential = broker_thread.enroll(ALICE.pid)
    other = Peer(broker_thread.port, ALICE.pid, credential, client_id="someone-else")
    assert not other.connect(expect_ok=False)[0]
    other.close()
    wrong = Peer(broker_thread.port, ALICE.pid, credential + "x")
    assert not wrong.connect(expect_ok=False)[0]
    wrong.close()
    ok = Peer(broker_thread.port, ALICE.pid, credential)
    ok.connect()
    ok.close()
    assert all(credential not in record.getMessage() for record in caplog.records)


def test_revoke_and_reenroll_disconnect_at_once(broker_thread):
    credential = broker_thread.enroll(ALICE.pid)
    alice = Peer(broker_thread.port, ALICE.pid, credential)
    alice.connect()
    new_credential = broker_thread.enroll(ALICE.pid)  # re-issued: the old one is dead
    assert alice.disconnected.wait(5)
    alice.close()
    old = Peer(broker_thread.port, ALICE.pid, credential)
    assert not old.connect(expect_ok=False)[0]
    old.close()
    alice = Peer(broker_thread.port, ALICE.pid, new_credential)
    alice.connect()
    broker_thread.revoke(ALICE.pid)
    assert alice.disconnected.wait(5)
    alice.close()


def test_a_device_enrolled_by_another_process_connects_at_once(tmp_path, monkeypatch):
    """`fieldchat broker enroll` then an immediate connect (the README's commands): the
    login does not wait for the broker's periodic accounts poll."""
    from fieldchat.broker import Store, _server

    monkeypatch.setattr(_server, "_ADMIN_POLL_S", 3600.0)  # no poll during the test
    config = make_config(tmp_path / "broker")
    with BrokerThread(config) as broker:
        with Store(config.db_path) as store:  # another connection, as another process
            credential = store.enroll(ALICE.pid)
        alice = Peer(broker.port, ALICE.pid, credential)
        alice.connect()
        alice.close()


def test_an_enrollment_while_a_credential_is_checked_does_not_refuse_it(tmp_path, monkeypatch):
    """Devices enrolled in parallel (the soak's setup, a fleet's provisioning): while
    one login's credential is hashed, another login reloads the accounts, which makes
    new Account objects. The first login was refused as if revoked (an identity
    comparison); only a changed or removed account is a revocation."""
    from fieldchat.broker import Store, _login, _server
    from fieldchat.broker._credentials import verify_credential

    monkeypatch.setattr(_server, "_ADMIN_POLL_S", 3600.0)
    config = make_config(tmp_path / "broker")
    with BrokerThread(config) as broker:
        with Store(config.db_path) as store:
            credential = store.enroll(ALICE.pid)
        bob_credential = ""

        def verify_while_bob_enrolls_and_logs_in(password, hashed):
            nonlocal bob_credential
            with Store(config.db_path) as store:  # another process enrolls bob
                bob_credential = store.enroll(BOB.pid)
            bob = Peer(broker.port, BOB.pid, bob_credential)  # his login reloads
            monkeypatch.setattr(_login, "verify_credential", verify_credential)
            bob.connect()
            bob.close()
            return verify_credential(password, hashed)

        monkeypatch.setattr(_login, "verify_credential", verify_while_bob_enrolls_and_logs_in)
        alice = Peer(broker.port, ALICE.pid, credential)
        alice.connect()
        alice.close()
