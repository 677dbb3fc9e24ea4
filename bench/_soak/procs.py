"""Child processes of the soak: started in sessions of their own, logged to files,
stopped by their own ids, and every one of them gone when the soak ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "FIELDCHAT",
    "Proc",
    "Registry",
    "SoakError",
    "child_env",
    "free_port",
    "http_ok",
    "port_open",
    "run",
    "wait_until",
]

FIELDCHAT = [sys.executable, "-c", "from fieldchat.cli import app; app()"]
STOP_TIMEOUT_S = 30.0  # a graceful stop that takes longer is escalated to SIGKILL
POLL_S = 0.1


class SoakError(RuntimeError):
    """The harness itself could not go on (a service did not start, a setup step
    failed); the message says which and where its log is."""


def child_env() -> dict[str, str]:
    """The environment of every child: none of the caller's FIELDCHAT_* settings,
    unbuffered output (screens and banners are read while the process runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # loopback only
            return int(response.status) == 200
    except (OSError, ValueError):
        return False


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until truthy.

    Raises:
        SoakError: not within ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise SoakError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_S)


def run(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0, what: str = ""
) -> str:
    """Run a setup command to completion; its stdout.

    Raises:
        SoakError: it failed or timed out (with its stderr).
    """
    try:
        done = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise SoakError(f"{what or argv[3:6]} timed out after {timeout:g} s") from None
    if done.returncode != 0:
        raise SoakError(
            f"{what or ' '.join(argv[3:8])} exited {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    return done.stdout


@dataclass(eq=False)  # identity: two runs of one command are two processes
class Proc:
    """A long-running child: ``start`` may be called again after it stopped."""

    name: str
    argv: list[str]
    log: Path
    stdout: Path | None = None  # default: the log
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    expected_down: bool = True  # False while it should be running
    exits: list[int] = field(default_factory=list)

    def start(self) -> Proc:
        for path in (self.log, self.stdout):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as err:
            out = self.stdout.open("ab") if self.stdout else err
            try:
                # A session of its own: a Ctrl-C meant for the harness does not reach
                # it; the harness stops it in order. A SIGINT the harness's own parent
                # ignored would be inherited as ignored; the harness installs its own
                # handler, so children start with the default one.
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=self.env,
                    start_new_session=True,
                )
            finally:
                if out is not err:
                    out.close()
        self.starts += 1
        self.expected_down = False
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def died(self) -> int | None:
        """The exit code when it stopped although it should be running."""
        if self.expected_down or self.popen is None:
            return None
        code = self.popen.poll()
        if code is not None:
            self.expected_down = True
            self.exits.append(code)
        return code

    def kill(self) -> int:
        """SIGKILL it; its exit code."""
        return self._signal(signal.SIGKILL, timeout=STOP_TIMEOUT_S)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Ask it to stop; SIGKILL after ``timeout``. Its exit code (negative: killed
        by that signal, as subprocess reports it)."""
        return self._signal(sig, timeout=timeout)

    def _signal(self, sig: int, timeout: float) -> int:
        self.expected_down = True
        popen = self.popen
        if popen is None:
            return 0
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, sig)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGKILL)
                popen.wait(10)
        code = popen.returncode
        self.exits.append(code)
        return code

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Registry:
    """Every child the soak started, so each is stopped on every way out."""

    procs: list[Proc] = field(default_factory=list)

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.stop(signal.SIGTERM, timeout=timeout)
