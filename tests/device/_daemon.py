"""``fieldchat device run`` in a child process, for the daemon tests."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO

from fieldchat.device.control_client import ControlClient, socket_path
from tests.device.conftest import start_cli


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Lines:
    """A child's pipe read line by line on a thread, so every wait has a deadline."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")  # end of the stream

    def next(self, timeout: float = 30) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output in {timeout} s") from None


class DaemonProcess:
    """``fieldchat device [--state …] run [ARGS]`` with ``env``; :meth:`start` waits until
    it serves."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = env
        self.args = list(args)
        self.state = Path(env["FIELDCHAT_STATE"])
        self.socket = socket_path(self.state)
        self.proc: subprocess.Popen[str] | None = None
        self.served = ""

    def start(self, timeout: float = 30) -> DaemonProcess:
        self.proc = start_cli(["run", *self.args], self.env)
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)
        line = self.out.next(timeout)
        assert line.startswith("fieldchat device run: serving "), (line, self._stderr())
        self.served = line.removeprefix("fieldchat device run: serving ").strip()
        return self

    def _stderr(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            return ""
        lines = []
        while line := self.err.next(5):
            lines.append(line)
        return "".join(lines)

    def client(self) -> ControlClient:
        client = ControlClient.connect(self.socket)
        assert client is not None, "the daemon does not answer"
        return client

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``; its exit status (within 30 s)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            status = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the daemon did not stop within 30 s") from None
        self.close()
        return status

    def close(self) -> None:
        if self.proc is not None:
            reap(self.proc)
        self.proc = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
