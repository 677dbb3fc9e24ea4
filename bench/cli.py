"""Cold start of the ``fieldchat`` command line (issue 18), as ratios to the time
``python -c "import paho.mqtt.client"`` takes in the same run, and the device
daemon's memory.

Each run of a command is paired with a run of the paho import just before it, so
both see the same load on a shared machine; a ratio is the median of ``--runs``
pairs' ratios (after one warm-up pair that is not counted: it fills the page cache
and, for ``--help``, typer's kept rendering, ``fieldchat/_help.py``):

* ``cli_help_ratio``: ``fieldchat device --help``;
* ``cli_help_uncached_ratio``: the same with ``FIELDCHAT_HELP_CACHE=0`` (typer renders);
* ``cli_send_standalone_ratio``: ``fieldchat device send CID TEXT`` with no daemon: it
  opens the state file, connects to the embedded broker (``fieldchat broker run`` on
  an ephemeral loopback port, started here) and waits for its PUBACK;
* ``cli_send_daemon_ratio``: the same command while ``fieldchat device run`` serves
  the state file (the command is its client);
* ``daemon_rss_mb``: the daemon's resident memory, idle, holding 10 conversations.

Prints one JSON object on its last line (the times too, in ms).

    .venv/bin/python bench/cli.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIELDCHAT = str(BIN / "fieldchat")
READY = re.compile(r"listening on mqtt://127\.0\.0\.1:(\d+)")
CONVERSATIONS = 10


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIELDCHAT_", "OTEL_"))}
    env.update(HOME=str(workdir), XDG_CACHE_HOME=str(workdir / "cache"), **extra)
    return env


PAHO = [sys.executable, "-c", "import paho.mqtt.client"]


def _wall_s(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=120)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed


@dataclass(frozen=True)
class Figure:
    """A command's median wall time, the paho import's beside it, and the median of
    the pairs' ratios."""

    seconds: float
    paho_seconds: float
    ratio: float


def _paired(argv: list[str], env: dict[str, str], runs: int) -> Figure:
    """``argv`` over ``runs`` processes, each after a paho import (one more pair first,
    uncounted)."""
    pairs = []
    for i in range(runs + 1):
        paho = _wall_s(PAHO, env)
        seconds = _wall_s(argv, env)
        if i:
            pairs.append((seconds, paho))
    return Figure(
        statistics.median(s for s, _ in pairs),
        statistics.median(p for _, p in pairs),
        statistics.median(s / p for s, p in pairs),
    )


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [FIELDCHAT, *args], env=env, capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        raise SystemExit(f"fieldchat {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


def _broker(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            FIELDCHAT,
            "broker",
            "run",
            "--port",
            "0",
            "--data-dir",
            str(workdir / "broker"),
            "--log-level",
            "WARNING",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if found := READY.search(line):
            return proc, int(found.group(1))
    proc.kill()
    raise SystemExit("the embedded broker did not start")


def _device(workdir: Path, env: dict[str, str], name: str, url: str) -> dict[str, str]:
    """A device with an identity, enrolled and registered; its environment."""
    state = str(workdir / f"{name}.db")
    mine = dict(env, FIELDCHAT_STATE=state, FIELDCHAT_BROKER=url)
    pid = json.loads(_cli(mine, "device", "init", "--json"))["pid"]
    credential = _cli(env, "broker", "enroll", "--data-dir", str(workdir / "broker"), pid)
    mine["FIELDCHAT_CREDENTIAL"] = credential
    _cli(mine, "device", "init")  # saves the credential, publishes the bundle
    mine["FIELDCHAT_PID"] = pid
    return mine


def _has_daemon(env: dict[str, str]) -> bool:
    done = subprocess.run(
        [FIELDCHAT, "device", "run", "--help"], env=env, capture_output=True, check=False
    )
    return done.returncode == 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmRSS")


def _daemon_figures(
    alice: dict[str, str], bob_pid: str, cid: str, runs: int
) -> tuple[Figure, float]:
    """Median ``send`` time through ``fieldchat device run``; its idle RSS (MB) with
    CONVERSATIONS conversations."""
    state = Path(alice["FIELDCHAT_STATE"])
    sock = state.with_name(state.name + ".sock")
    daemon = subprocess.Popen(
        [FIELDCHAT, "device", "run"],
        env=alice,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start: {daemon.communicate()[1]}")
            time.sleep(0.05)
        seconds = _paired([FIELDCHAT, "device", "send", cid, "through the daemon"], alice, runs)
        existing = len(_cli(alice, "device", "conv", "list").splitlines())
        for _ in range(CONVERSATIONS - existing):
            _cli(alice, "device", "conv", "create", bob_pid)
        time.sleep(3.0)  # idle: receipts and bundles settled
        rss = _rss_mb(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(60)
    return seconds, rss


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="pairs per figure (≥ 10)")
    args = parser.parse_args()
    daemon: Figure | None = None
    rss = None
    with tempfile.TemporaryDirectory(prefix="fieldchat-bench-cli-") as tmp:
        workdir = Path(tmp)
        env = _env(workdir)
        help_ = _paired([FIELDCHAT, "device", "--help"], env, args.runs)
        uncached = _paired(
            [FIELDCHAT, "device", "--help"], _env(workdir, FIELDCHAT_HELP_CACHE="0"), args.runs
        )
        broker, port = _broker(workdir, env)
        try:
            url = f"mqtt://127.0.0.1:{port}"
            bob = _device(workdir, env, "bob", url)
            alice = _device(workdir, env, "alice", url)
            cid = _cli(alice, "device", "conv", "create", bob["FIELDCHAT_PID"])
            standalone = dict(alice, FIELDCHAT_NO_DAEMON="1")
            send = _paired([FIELDCHAT, "device", "send", cid, "standalone"], standalone, args.runs)
            if _has_daemon(env):
                daemon, rss = _daemon_figures(alice, bob["FIELDCHAT_PID"], cid, args.runs)
        finally:
            broker.terminate()
            broker.wait(60)
    pahos = [f.paho_seconds for f in (help_, uncached, send, daemon) if f is not None]
    result = {
        "paho_import_ms": _ms(statistics.median(pahos)),
        "cli_help_ms": _ms(help_.seconds),
        "cli_help_uncached_ms": _ms(uncached.seconds),
        "cli_send_standalone_ms": _ms(send.seconds),
        "cli_send_daemon_ms": _ms(daemon.seconds if daemon else None),
        "cli_help_ratio": round(help_.ratio, 2),
        "cli_help_uncached_ratio": round(uncached.ratio, 2),
        "cli_send_standalone_ratio": round(send.ratio, 2),
        "cli_send_daemon_ratio": round(daemon.ratio, 2) if daemon else None,
        "daemon_rss_mb": None if rss is None else round(rss, 1),
        "runs": args.runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
