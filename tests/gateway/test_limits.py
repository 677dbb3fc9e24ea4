"""Resource limits of the gateway (issue 13, item 6), against real servers: request
bodies and WebSocket messages under ``fieldchat up`` and ``gateway run``, concurrent
and distributed password guessing, registration floods, and forged proxy headers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fieldchat.gateway._ws import MAX_FRAME_BYTES
from tests.fieldchat.test_up import FIELDCHAT, read_banner
from tests.gateway._support import GatewayProcess, make_settings, serve_gateway

pytestmark = pytest.mark.mosquitto

PASSWORD = "the right password"
HUGE = 200 * 1024 * 1024  # what the attack sent


# -- servers in processes of their own ------------------------------------------------


@dataclass
class Served:
    kind: str
    proc: subprocess.Popen[Any]
    base: str

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert found is not None, status
        return int(found.group(1))


@contextlib.contextmanager
def fieldchat_up(tmp: Path, **env: str) -> Iterator[Served]:
    """``fieldchat up`` in a child process (its embedded broker, its SQLite)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    proc = subprocess.Popen(
        [FIELDCHAT, "up", "--data-dir", str(tmp / "data"), "--mqtt-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**clean, **env},
    )
    try:
        banner = read_banner(proc)
        found = re.search(r"web\s+(http://\S+)/", banner)
        assert found is not None, banner
        web = found.group(1)
        yield Served("up", proc, web)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


@pytest.fixture(scope="module", params=["up", "run"])
def served(request, tmp_path_factory, mosquitto) -> Iterator[Served]:
    """The same app served both ways: ``fieldchat up`` and ``fieldchat gateway run``."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "up":
        with fieldchat_up(tmp) as up:
            yield up
        return
    gw = GatewayProcess(
        tmp / "gw",
        mqtt_url=mosquitto.url,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}/v1",
        database_url=f"sqlite:///{tmp / 'history.db'}",
        mqtt_client_id=f"gw-{uuid.uuid4().hex[:8]}",
    ).start()
    try:
        asyncio.run(gw.healthy())
        assert gw.proc is not None
        yield Served("run", gw.proc, gw.base)
    finally:
        gw.stop()


# -- request bodies -------------------------------------------------------------------


def _read_answer(sock: socket.socket, timeout: float = 10) -> bytes:
    """Whatever the server says until it closes or goes quiet for ``timeout``."""
    sock.settimeout(timeout)
    answer = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    return answer


def _declared_huge_body(port: int) -> bytes:
    """Headers that announce 200 MB, and not a byte of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/accounts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % HUGE
        )
        return _read_answer(sock)


def _streamed_huge_body(port: int, budget: int) -> tuple[int, bytes]:
    """Send a chunked body of up to ``budget`` bytes until the server answers or hangs
    up; return (bytes sent, the answer)."""
    piece = 65_536
    frame = b"%x\r\n" % piece + b"x" * piece + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/accounts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < budget:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(frame)
                sent += piece
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_answer(sock)
    return sent, answer


async def test_a_huge_body_is_refused_before_it_is_read(served):
    """The attack: 200 MB to the unauthenticated ``POST /v1/accounts`` raised the
    gateway's memory by 560 MB before a 422. Now: 413 from the Content-Length alone, and
    a chunked body is cut off after the limit; the server's memory stays put."""
    before = served.rss_kib()
    answer = await asyncio.to_thread(_declared_huge_body, served.port)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"limited to 65536 bytes" in answer
    sent, answer = await asyncio.to_thread(_streamed_huge_body, served.port, 32 * 1024 * 1024)
    # refused while the client was still sending: at most the limit plus what the
    # kernel buffers of a loopback connection hold
    assert sent < 8 * 1024 * 1024, sent
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert served.rss_kib() - before < 30 * 1024
    async with httpx.AsyncClient(base_url=served.base, timeout=20) as http:
        r = await http.post("/v1/accounts", json={"username": "fits", "password": "x" * 60_000})
        assert r.status_code == 422  # under the limit: read, and judged by the model
        r = await http.post(
            "/v1/accounts",
            content=b"{" + b" " * 70_000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"


async def test_a_huge_websocket_message_closes_the_socket(served):
    name = f"ws{served.kind}"
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        r = await http.post("/v1/accounts", json={"username": name, "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = await http.post("/v1/session", json={"username": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        cookie = {"Cookie": f"fc_session={http.cookies['fc_session']}"}
    ws_url = served.base.replace("http://", "ws://") + "/ws"
    async with connect(ws_url, additional_headers=cookie, max_size=None) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 20))["op"] == "hello"
        await ws.send("x" * (MAX_FRAME_BYTES + 1))  # over the app's limit: an error frame
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 20)))["op"] != "error":
            pass
        assert frame["reason"] == "limit"
        await ws.send("x" * (300 * 1024))  # over the server's: the socket is closed
        with pytest.raises(ConnectionClosed):
            await _drain(ws)
        assert ws.close_code == 1009


async def _drain(ws) -> None:
    """Read frames until the socket closes (bounded: 20 s of silence fails)."""
    while True:
        await asyncio.wait_for(ws.recv(), 20)


# -- logins and registrations ---------------------------------------------------------

SLOW_ARGON2 = {"argon2_time_cost": 2, "argon2_memory_kib": 8192, "argon2_parallelism": 1}


async def test_concurrent_guesses_are_refused_before_they_are_hashed(mosquitto, prefix, tmp_path):
    """24 guesses at once for one user: 5 hashed (the limit), the rest refused at once."""
    settings = make_settings(mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}", **SLOW_ARGON2)
    async with serve_gateway(settings) as gw, gw.client() as http:
        assert (
            await http.post("/v1/accounts", json={"username": "erin", "password": PASSWORD})
        ).status_code == 201

        async def guess(i: int) -> int:
            body = {"username": "erin", "password": f"guess number {i:04d}"}
            return (await http.post("/v1/session", json=body)).status_code

        codes = await asyncio.gather(*(guess(i) for i in range(24)))
        hashed = gw.state.metrics.registry.get_sample_value(
            "fieldchat_gateway_logins_total", {"outcome": "failed"}
        )
        assert codes.count(401) == hashed <= 5, codes
        assert codes.count(429) == 24 - hashed


async def test_failed_guesses_do_not_lock_the_user_out_of_their_own_browser(
    mosquitto, prefix, tmp_path
):
    """An attacker's failures lock the user name for clients it does not know; the
    user's browser, which logged in before (device cookie), still gets in."""
    settings = make_settings(
        mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}", forwarded_allow_ips="127.0.0.1"
    )

    def at(address: str) -> dict[str, str]:
        return {"x-forwarded-for": address}

    creds = {"username": "victim", "password": PASSWORD}
    async with (
        serve_gateway(settings) as gw,
        gw.client(headers=at("10.0.0.7")) as victim,
        gw.client() as attacker,
        gw.client(headers=at("10.0.0.9")) as stranger,
    ):
        assert (await victim.post("/v1/accounts", json=creds)).status_code == 201
        assert (await victim.post("/v1/session", json=creds)).status_code == 200
        # distributed guessing: a new address each time, so only the user name counts
        codes = [
            (
                await attacker.post(
                    "/v1/session",
                    json={"username": "victim", "password": f"guess {i:04d}!"},
                    headers=at(f"10.0.1.{i}"),
                )
            ).status_code
            for i in range(8)
        ]
        assert codes == [401] * 5 + [429] * 3
        # an unknown client with the right password waits (OWASP: untrusted clients) …
        r = await stranger.post("/v1/session", json=creds)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # … the user's own browser, known by its device cookie, does not
        assert (await victim.post("/v1/session", json=creds)).status_code == 200
        assert "fc_device" in victim.cookies
        # a device cookie of another user, or a forged one, is an unknown client
        assert (
            await attacker.post("/v1/accounts", json={"username": "mallory", "password": PASSWORD})
        ).status_code == 201
        r = await attacker.post(
            "/v1/session",
            json={"username": "mallory", "password": PASSWORD},
            headers=at("10.0.2.1"),
        )
        assert r.status_code == 200 and "fc_device" in attacker.cookies
        assert (
            await attacker.post("/v1/session", json=creds, headers=at("10.0.2.2"))
        ).status_code == 429
        forged = victim.cookies["fc_device"][:-4] + "AAAA"
        r = await stranger.post(
            "/v1/session", json=creds, headers={**at("10.0.2.3"), "cookie": f"fc_device={forged}"}
        )
        assert r.status_code == 429
        # guesses with the device cookie are limited per cookie
        codes = [
            (
                await victim.post(
                    "/v1/session", json={"username": "victim", "password": f"typo {i}!!"}
                )
            ).status_code
            for i in range(6)
        ]
        assert codes == [401] * 5 + [429]


async def test_registrations_are_limited_per_address(mosquitto, prefix, tmp_path):
    """20 registrations from one address all went through; now the 11th waits."""
    settings = make_settings(mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}")
    async with serve_gateway(settings) as gw, gw.client() as http:
        codes = []
        for i in range(20):
            r = await http.post(
                "/v1/accounts", json={"username": f"bot{i:02d}", "password": PASSWORD}
            )
            codes.append(r.status_code)
        assert codes == [201] * 10 + [429] * 10
        assert int(r.headers["retry-after"]) > 3000  # the window is an hour
        assert r.json()["error"] == "rate_limited"
        assert gw.state.metrics.rejected_count("http", "rate_limited") == 10


# -- proxy headers --------------------------------------------------------------------


def _guesses_from_forged_addresses(base: str, n: int) -> list[int]:
    """``n`` failed logins, each for another user name and with another forged
    ``X-Forwarded-For``: only the per-address limit can stop them."""
    with httpx.Client(base_url=base, timeout=30) as http:
        return [
            http.post(
                "/v1/session",
                json={"username": f"nobody{i}", "password": "wrong password"},
                headers={"x-forwarded-for": f"203.0.113.{i}"},
            ).status_code
            for i in range(n)
        ]


def test_fieldchat_up_ignores_forwarded_for_by_default(tmp_path):
    with fieldchat_up(tmp_path) as up:
        assert _guesses_from_forged_addresses(up.base, 7) == [401] * 5 + [429] * 2


def test_fieldchat_up_trusts_forwarded_for_from_the_proxies_named(tmp_path):
    with fieldchat_up(tmp_path, FIELDCHAT_GATEWAY_FORWARDED_ALLOW_IPS="127.0.0.1") as up:
        assert _guesses_from_forged_addresses(up.base, 7) == [401] * 7


async def test_gateway_run_options_ignore_forwarded_for_by_default(mosquitto, prefix, tmp_path):
    settings = make_settings(mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}")
    async with serve_gateway(settings) as gw:
        codes = await asyncio.to_thread(_guesses_from_forged_addresses, gw.base, 7)
    assert codes == [401] * 5 + [429] * 2
