"""One soak device: ``fieldchat device … listen --json`` plus a thread that sends.

A state file belongs to one process at a time (``DeviceState.lock``), so a device
cannot run ``listen`` and a separate ``send`` process side by side. This driver runs
the real ``listen`` command (the same typer app as the ``fieldchat`` script; its
stdout is the device's *screen*) and, on the very ``Device`` that command opens,
a thread that sends numbered texts at a steady rate, as an app that shows and sends
on one connection does (``fieldchat device chat`` does the same for one
conversation). It can be SIGKILLed at any moment and started again: it resumes
numbering after the last message its state file holds as sent.

Usage (the harness, ``bench/soak.py``, starts it):
    SOAK_NAME=d0 SOAK_DIR=run/ SOAK_CONVS=cid1,cid2 SOAK_RATE=2 SOAK_MAX=0 \\
        python bench/_soak/driver.py device --state d0.db … listen --json

Files in ``SOAK_DIR``: ``ready/<name>`` once connected and a member of every
conversation; it sends only once ``go`` exists, and stops when ``stop`` exists,
then writes ``final/<name>.json`` (the last ``n`` per conversation).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the checkout, not bench/_soak

import fieldchat.device.client
from fieldchat.cli import app
from fieldchat.device.client import Device
from fieldchat.schemas.errors import FieldchatError

log = logging.getLogger("soak.driver")

POLL_S = 0.2  # how often the sender looks at the harness's files while waiting


class _Config:
    def __init__(self, env: dict[str, str]) -> None:
        self.name = env["SOAK_NAME"]
        self.dir = Path(env["SOAK_DIR"])
        self.convs = [c for c in env["SOAK_CONVS"].split(",") if c]
        self.rate = float(env.get("SOAK_RATE", "2"))
        self.cap = int(env.get("SOAK_MAX", "0"))  # per conversation; 0: no cap


CONFIG = _Config(dict(os.environ))


def _write(path: Path, text: str) -> None:
    """Write a file whole (rename): the harness never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class SoakDevice(Device):
    """The ``Device`` the listen command opens, with the soak's sending thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - Device's own
        super().__init__(*args, **kwargs)
        self._soak_stop = threading.Event()
        self._soak_thread: threading.Thread | None = None

    def start(self) -> Device:
        super().start()
        if self._soak_thread is None:
            self._soak_thread = threading.Thread(
                target=self._soak_main, name="soak-sender", daemon=True
            )
            self._soak_thread.start()
        return self

    def close(self) -> None:
        self._soak_stop.set()
        if self._soak_thread is not None:
            self._soak_thread.join(10)
        super().close()

    def _soak_main(self) -> None:
        try:
            self._soak_send()
        except Exception:
            log.exception("soak sender stopped")

    def _soak_wait(self, done: Any) -> bool:  # noqa: ANN401 - a predicate
        """Poll ``done()``; False when the device is closing."""
        while not done():
            if self._soak_stop.wait(POLL_S):
                return False
        return True

    def _soak_send(self) -> None:
        cfg = CONFIG
        stop_file, go_file = cfg.dir / "stop", cfg.dir / "go"
        joined = self._soak_wait(
            lambda: (
                stop_file.exists()
                or (self.connected and all(map(self.engine.is_member, cfg.convs)))
            )
        )
        if not joined:
            return
        if not stop_file.exists():
            _write(cfg.dir / "ready" / cfg.name, str(time.time()))
        if not self._soak_wait(lambda: go_file.exists() or stop_file.exists()):
            return
        # Numbering resumes after what the state file holds as sent: a SIGKILL right
        # after a send returned loses no number and reuses none.
        nxt = {cid: 1 + max(_numbers(self, cid), default=0) for cid in cfg.convs}
        period = 1.0 / cfg.rate
        due = time.monotonic()
        while not stop_file.exists():
            open_convs = [c for c in cfg.convs if not cfg.cap or nxt[c] <= cfg.cap]
            if not open_convs:
                break
            for cid in open_convs:
                try:
                    self.send(cid, f"soak {cfg.name} {nxt[cid]}")
                except FieldchatError as exc:
                    log.warning("send to %s failed: %s", cid, exc)
                    continue
                nxt[cid] += 1
            due += period
            if due < time.monotonic() - 5 * period:
                due = time.monotonic()  # fell behind (a stalled machine): no burst to catch up
            if self._soak_stop.wait(max(0.0, due - time.monotonic())):
                return
        self._soak_wait(stop_file.exists)
        last = {cid: max(_numbers(self, cid), default=0) for cid in cfg.convs}
        _write(cfg.dir / "final" / f"{cfg.name}.json", json.dumps(last))


def _numbers(device: Device, cid: str) -> list[int]:
    prefix = f"soak {CONFIG.name} "
    return [int(row.text[len(prefix) :]) for row in device.sent(cid) if row.text.startswith(prefix)]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # `listen` imports Device from fieldchat.device.client when it opens the state file
    # (the command line loads the device stack lazily); the app and its options are
    # otherwise exactly the `fieldchat` command's.
    fieldchat.device.client.Device = SoakDevice  # type: ignore[misc]
    sys.argv = ["fieldchat", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
