"""``fieldchat broker run`` in a child process: for SIGKILL and memory measurements."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_LISTENING = re.compile(r"listening on mqtt://127\.0\.0\.1:(\d+)")


class BrokerProcess:
    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        config: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-c",
            "from fieldchat.cli import app; app()",
            "broker",
            "run",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            *args,
        ]
        if config is not None:
            path = data_dir.parent / f"{data_dir.name}.toml"
            path.write_text(config)
            argv += ["--config", str(path)]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 30
        self.port = 0
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            found = _LISTENING.search(line)
            if found:
                self.port = int(found.group(1))
                return
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        raise AssertionError("the broker process did not start")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()

    def terminate(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        return code
