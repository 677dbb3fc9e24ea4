"""Fixtures of the cluster tests: a three-node NATS cluster and gateway processes.

The cluster is made per test (it starts in well under a second) and enrolled before it
starts, so nothing depends on a configuration reload. Tests skip, with the reason,
where Debian's nats-server is not installed; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster._nats import NATS_SERVER, Cluster, environment_without_fieldchat, free_port

FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 64, "argon2_parallelism": 1}


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Cluster]:
    """Three NATS nodes, configured but not started: enroll users, then ``start()``."""
    if not Path(NATS_SERVER).exists():
        pytest.skip(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    cluster = Cluster(tmp_path / "nats")
    yield cluster
    cluster.stop()


class GatewayProcess:
    """``fieldchat gateway run`` in a child process, configured by a TOML file.

    The MQTT password goes in the TOML file (0600), never on the command line.
    """

    def __init__(self, workdir: Path, **settings: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "gateway.toml"
        lines = [f"port = {self.port}", 'host = "127.0.0.1"']
        for key, value in {**FAST_ARGON2, **settings}.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value!r}")
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o600)
        self.log = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from fieldchat.cli import app; app()",
                    "gateway",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment_without_fieldchat(),
            )
        return self

    async def healthy(self, timeout: float = 60.0) -> None:
        """``/healthz`` 200: the database is open and the archiver is connected."""
        end = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"gateway exited: {self.tail()}")
                try:
                    if (await http.get(f"{self.base}/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > end:
                    raise AssertionError(f"gateway not healthy in {timeout} s: {self.tail()}")
                await asyncio.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
