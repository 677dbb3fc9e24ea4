"""The stack the browser tests run against, all on 127.0.0.1 with ephemeral ports: the
embedded broker (a thread), the gateway with the web client mounted (uvicorn in a
thread of its own), Python devices on the broker, and headless Debian Chromium driven
by Playwright. Nothing is mocked; every wait is bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import SecretStr
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from fieldchat.broker import BrokerThread
from fieldchat.broker.testing import make_config
from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions, LinkOptions
from fieldchat.gateway import GatewaySettings, create_app
from fieldchat.schemas.topics import DEFAULT_PREFIX

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = Path(__file__).with_name("pages")
# An init script that takes ML-KEM away from a page's WebCrypto, as in a browser without
# it: no encapsulateBits/decapsulateBits, and generateKey/importKey refuse the name.
NO_MLKEM = """
(() => {
  const proto = SubtleCrypto.prototype;
  delete proto.encapsulateBits;
  delete proto.decapsulateBits;
  for (const name of ["generateKey", "importKey"]) {
    const real = proto[name];
    proto[name] = function (...args) {
      const alg = name === "generateKey" ? args[0] : args[2];
      const algName = typeof alg === "string" ? alg : alg && alg.name;
      if (/^ML-KEM/i.test(String(algName))) {
        const refusal = new DOMException("Algorithm: Unrecognized name", "NotSupportedError");
        return Promise.reject(refusal);
      }
      return real.apply(this, args);
    };
  }
})();
"""
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
DEADLINE_S = 30.0
FAST_ARGON2: dict[str, Any] = {
    "argon2_time_cost": 1,
    "argon2_memory_kib": 64,
    "argon2_parallelism": 1,
}
FAST_LINK = LinkOptions(
    receipt_interval_s=0.2,
    backoff_min_s=0.1,
    backoff_max_s=1.0,
    resend_after_s=1.0,
    reorder_window_s=0.5,
)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (the Python package) is not installed"
    return None


class GatewayThread:
    """The gateway app (which mounts the web client at ``/``) under uvicorn in a thread."""

    def __init__(self, settings: GatewaySettings, *, extra_static: Path | None = None) -> None:
        self.app = create_app(settings)
        if extra_static is not None:  # test pages, only in tests; before the "/" mount
            self.app.router.routes.insert(0, Mount("/_tests", StaticFiles(directory=extra_static)))
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            lifespan="on",
            log_level="warning",
            ws="websockets-sansio",
        )
        self.server = uvicorn.Server(config)
        # uvicorn installs signal handlers only on the main thread: this one is not.
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve()), name="gateway", daemon=True
        )
        self.port = 0

    def start(self) -> GatewayThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn to start")
        if not self.server.started:
            raise RuntimeError("the gateway did not start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        wait_until(self.app.state.gateway.archiver.connected.is_set, "the archiver to connect")
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Any:
        return self.app.state.gateway

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Stack:
    """Broker + gateway + devices for one test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = DEFAULT_PREFIX
        self.broker = BrokerThread(make_config(tmp / "broker"))
        self.devices: list[Device] = []
        self.gateway: GatewayThread | None = None
        self.db_path = tmp / "history.db"

    def start(self) -> Stack:
        self.broker.start()
        user, credential = self.broker.add_gateway("web-tests")
        settings = GatewaySettings(
            mqtt_url=f"mqtt://127.0.0.1:{self.broker.port}",
            mqtt_protocol="3.1.1",
            mqtt_username=user,
            mqtt_password=SecretStr(credential),
            mqtt_client_id=user,
            topic_prefix=self.prefix,
            database_url=f"sqlite:///{self.db_path}",
            feed_poll_s=0.2,
            pending_retry_s=0.5,
            batch_wait_s=0.01,
            **FAST_ARGON2,
        )
        self.gateway = GatewayThread(settings, extra_static=PAGES).start()
        return self

    @property
    def base(self) -> str:
        assert self.gateway is not None
        return self.gateway.base

    def device(self, name: str) -> Device:
        """A Python device (paho, SQLite state, ML-KEM) enrolled on the broker."""
        path = self.tmp / f"{name}.sqlite3"
        probe = Device(path, prefix=self.prefix)
        pid = probe.pid
        probe.close()
        options = BrokerOptions(
            host="127.0.0.1", port=self.broker.port, credential=SecretStr(self.broker.enroll(pid))
        )
        device = Device(path, options, link=FAST_LINK, prefix=self.prefix)
        self.devices.append(device)
        device.start()
        device.wait_connected(10)
        return device

    def stop(self) -> None:
        for device in self.devices:
            with contextlib.suppress(Exception):
                device.close()
        if self.gateway is not None:
            self.gateway.stop()
        self.broker.stop()


@contextlib.contextmanager
def running_stack(tmp: Path) -> Iterator[Stack]:
    stack = Stack(tmp)
    try:
        yield stack.start()
    finally:
        stack.stop()
