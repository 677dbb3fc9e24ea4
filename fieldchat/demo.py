"""``fieldchat demo``: the stack plus two simulated devices chatting, for a newcomer.

A pump controller and a technician's laptop (real :class:`~device.client.Device`
clients over the embedded broker, state under ``<data>/demo/``) talk in one
conversation. Every web user who registers on the page is invited by the pump
within seconds, so a newcomer sees encrypted messages arrive in the browser at once.
The devices learn of web users the way an operator would: from the gateway's
account list (admin data the gateway holds anyway; no key or plaintext involved).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions
from fieldchat.device.history import GatewayHistory
from fieldchat.gateway import GatewayStore
from fieldchat.schemas.errors import ConfigError, FieldchatError, NotAMember
from fieldchat.stack import Stack, StackOptions, open_stack

__all__ = ["DEMO_MARK", "MAX_DEMO_MESSAGES", "claim_data_dir", "run_demo"]

log = logging.getLogger("fieldchat.demo")

MAX_DEMO_MESSAGES = 2_000  # the chat stops by itself after this many
# The demo writes scripted messages into its gateway's history: it marks its data
# folder, and runs only in an empty folder or one it marked (issue 18: beside
# `fieldchat up` it used to share fieldchat-data and filled a real user's history).
DEMO_MARK = "fieldchat-demo"
LINES = (
    ("pump-pi", "Pump 3 pressure 4.2 bar, flow nominal."),
    ("tech-laptop", "Thanks. Valve B still sticky?"),
    ("pump-pi", "Valve B closed at 14:02, reopened 14:05: response 3.1 s."),
    ("tech-laptop", "On my way, back on site at 14:30."),
    ("pump-pi", "Tank level 72 %, rising 0.4 %/min."),
    ("tech-laptop", "Logged. Ping me if it passes 90 %."),
)


class _Demo:
    """The two devices and the loop that makes them talk and invite web users."""

    def __init__(self, stack: Stack, state_dir: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.stack = stack
        self.loop = loop
        self.stop = threading.Event()
        self.invited: set[str] = set()
        port = int(stack.mqtt_url.rsplit(":", 1)[1])
        state_dir.mkdir(parents=True, exist_ok=True)
        self.devices: dict[str, Device] = {}
        for name in ("pump-pi", "tech-laptop"):
            device = Device(state_dir / f"{name}.db")
            credential = stack.broker.enroll(device.pid)
            device.close()
            device = Device(
                state_dir / f"{name}.db",
                BrokerOptions(
                    host="127.0.0.1",
                    port=port,
                    credential=SecretStr(credential),
                    protocol="3.1.1",
                ),
            )
            device.history = GatewayHistory(stack.web_url, device.engine.identity)
            self.devices[name] = device.start()

    def web_pids(self) -> set[str]:
        """Browser participants registered at the gateway."""
        store: GatewayStore = self.stack.app.state.gateway.store

        async def collect() -> set[str]:
            pids: set[str] = set()
            for account in await store.list_accounts():
                full = await store.account(account.id)
                if full is not None:
                    pids.update(full.pids)
            return pids

        return asyncio.run_coroutine_threadsafe(collect(), self.loop).result(timeout=30)

    def run(self) -> None:
        pump, laptop = self.devices["pump-pi"], self.devices["tech-laptop"]
        for device in (pump, laptop):
            device.wait_connected(30)
        cid = next(
            (c.cid for c in pump.conversations() if c.member),
            None,
        ) or pump.create_conversation([laptop.pid], timeout=30)
        self.invited = set(pump.engine.roster(cid).pids)
        for count, (name, text) in zip(range(MAX_DEMO_MESSAGES), itertools.cycle(LINES)):
            if self.stop.wait(4.0 if count else 1.0):
                return
            try:
                for pid in sorted(self.web_pids() - self.invited):
                    self._invite(cid, pid)
                if laptop.engine.is_member(cid):
                    self.devices[name].send(cid, f"{text} #{count + 1}")
            except (FieldchatError, TimeoutError) as exc:
                log.warning("demo step skipped: %s", exc)

    def _invite(self, cid: str, pid: str) -> None:
        """Invite one web participant. The conversation requires post-quantum members
        (the default policy): a browser without WebCrypto ML-KEM-768 is told apart in
        the log and not asked again, and does not hold up the others."""
        try:
            self.devices["pump-pi"].invite(cid, [pid], timeout=10)
            log.info("invited web participant %s", pid)
        except NotAMember:
            log.warning(
                "web participant %s has no ML-KEM-768 key (its browser lacks WebCrypto"
                " ML-KEM): the demo conversation admits post-quantum members only",
                pid,
            )
        self.invited.add(pid)

    def close(self) -> None:
        self.stop.set()
        for device in self.devices.values():
            device.close()


def claim_data_dir(data_dir: Path) -> None:
    """Make ``data_dir`` the demo's, or refuse one that holds other data (a running or
    past ``fieldchat up``'s): the demo never writes into a real history.

    Raises:
        ConfigError: ``data_dir`` holds data the demo did not make.
    """
    mark = data_dir / DEMO_MARK
    if data_dir.is_dir() and any(data_dir.iterdir()) and not mark.is_file():
        raise ConfigError(
            f"{data_dir} holds data the demo did not make (`fieldchat up`'s?); the demo "
            "writes scripted messages into its history, so it runs in its own folder: "
            "pass --data-dir with a new one (the default is fieldchat-demo)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text("made by `fieldchat demo`: its history holds scripted messages\n")


async def run_demo(options: StackOptions, echo: Callable[[str], None] = print) -> None:
    """Run the stack and the chatting devices until SIGINT/SIGTERM.

    Raises:
        PortInUse, ConfigError: as :func:`fieldchat.stack.run_stack`, or a data
            folder that is not the demo's (:func:`claim_data_dir`).
    """
    claim_data_dir(options.data_dir)
    async with open_stack(options) as stack:
        demo = await asyncio.to_thread(
            _Demo, stack, options.data_dir / "demo", asyncio.get_running_loop()
        )
        worker = threading.Thread(target=demo.run, name="fieldchat-demo", daemon=True)
        worker.start()
        echo(
            "\n".join(
                [
                    "fieldchat demo is up: two devices are chatting, end-to-end encrypted.",
                    f"  web   {stack.web_url}",
                    f"  mqtt  {stack.mqtt_url}",
                    "",
                    "Open the web page, register any name and password: the pump invites",
                    "you within seconds and their messages appear. Ctrl-C stops everything.",
                ]
            )
        )
        try:
            await asyncio.shield(stack.serving)
        finally:
            demo.stop.set()
            await asyncio.to_thread(worker.join, 15)
            await asyncio.to_thread(demo.close)
    echo("fieldchat demo stopped.")
