"""Chaos soak (issue 14): devices chat while brokers, gateways and devices are killed.

For each topology — ``embedded`` (``fieldchat up``: broker + gateway + SQLite) and
``scaled`` (Mosquitto with our generated config + two ``fieldchat gateway run``
sharing one PostgreSQL database) — it starts the stack and N devices through the real
CLI, puts them in one group conversation and one 1:1, and lets each device send
numbered texts (``soak <device> <n>``) at a steady rate while a seeded schedule
SIGKILLs and gracefully restarts (SIGTERM) the broker and devices and SIGKILLs
gateways, starting each again after a random downtime (bench/_soak/chaos.py: up to
3 s for the stack, up to 15 s for a device, during which the chaos goes on). Then it
stops sending, waits (with a deadline) for things to settle, and checks every
device's screen (what ``fieldchat device listen --json`` printed, across restarts)
and the archive (the gateway's history API) against what each sender accepted (its
state file):

* per screen: lost, duplicated, out of order (bench/_soak/check.py has the rules);
* archive: accepted messages with no archived envelope, duplicate envelopes, and
  archived texts no sender accepted.

Loopback only, ephemeral ports, temporary folders and database, all removed at the end
(also on Ctrl-C, SIGTERM and the hard deadline); every child is stopped by its id.
Prints a summary, then one JSON object on the last line. Exit status: 0 when nothing
was lost, duplicated or out of order and the archive is complete (or ``--report-only``),
1 when something was, 2 when the harness itself could not run (the message says
where), 130 when interrupted.

Usage: python bench/soak.py [--short] [--topology embedded|scaled|both] [--seed S]
       [--devices N] [--rate R] [--duration S] [--messages M] [--settle S]
       [--broker-kills K] [--broker-away-kills K] [--broker-restarts K] [--gateway-kills K]
       [--device-kills K] [--device-restarts K] [--deadline S] [--report-only] [--keep]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# This folder holds scripts named like the packages they measure: import from the checkout.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench._soak.chaos import Event, Kind, schedule
from bench._soak.check import SentMessage, check_archive, check_screens
from bench._soak.fleet import ArchiveReader, Fleet, read_archive
from bench._soak.procs import Proc, Registry, SoakError, child_env
from bench._soak.stacks import Embedded, Scaled, scaled_unavailable

TOPOLOGIES = ("embedded", "scaled")
# The long soak (BENCHMARKS.md, "Chaos soak") and the short one `make test` runs.
LONG = {
    "devices": 5,
    "rate": 2.0,
    "duration": 720.0,
    "settle": 180.0,
    "broker_kills": 6,
    "broker_away_kills": 4,
    "broker_restarts": 3,
    "gateway_kills": 8,
    "device_kills": 10,
    "device_restarts": 2,
}
SHORT = {
    "devices": 3,
    "rate": 2.0,
    "duration": 35.0,
    "settle": 45.0,
    "broker_kills": 1,
    "broker_away_kills": 1,
    "broker_restarts": 1,
    "gateway_kills": 2,
    "device_kills": 2,
    "device_restarts": 0,
}
CHAOS_SPAN = (0.1, 0.85)  # of the sending phase: a calm start and a calm end
SETUP_BUDGET_S = 300.0  # per topology, for the hard deadline's default
FINALS_TIMEOUT_S = 30.0
POLL_S = 2.0


class Interrupted(BaseException):
    """SIGINT, SIGTERM or the hard deadline: stop, clean up, report what was seen."""


def _say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Chaos:
    """Applies the schedule, and restarts whatever died on its own (counted).

    A broker or gateway event waits until its process serves again before the next
    event; a stopped device is started again in the background when its downtime is
    over, so later events (a broker kill, say) can happen while it is away."""

    stack: Embedded | Scaled
    fleet: Fleet
    registry: Registry
    kills: Counter[str] = field(default_factory=Counter)
    graceful_exit_codes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    away: list[tuple[float, Proc]] = field(default_factory=list)  # devices: when to start

    def monitor(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self.away if e[0] <= now]:
            self.away.remove(entry)
            entry[1].start()
        for proc in self.registry.procs:
            code = proc.died()
            if code is None:
                continue
            _say(f"{proc.name} exited by itself ({code}); restarting it")
            self.unexpected_exits.append({"process": proc.name, "code": code, "log": proc.tail(3)})
            self._start(proc)

    def sleep_until(self, moment: float) -> None:
        while (left := moment - time.monotonic()) > 0:
            self.monitor()
            time.sleep(min(left, 0.25))
        self.monitor()

    def apply(self, event: Event) -> None:
        if event.kind is Kind.BROKER_SIGKILL_AWAY:
            self._away(event)
            return
        proc = self._target(event)
        if proc is None:
            self.skipped += 1  # every device is away already
            return
        if event.kind.graceful:
            code = proc.stop(signal.SIGTERM)
            self.graceful_exit_codes[proc.name].append(code)
        else:
            proc.kill()
        self.kills[event.kind.value] += 1
        _say(f"{event.kind.value} {proc.name}; down {event.down_s:.1f} s")
        if event.kind.role == "device":
            self.away.append((time.monotonic() + event.down_s, proc))
            return
        self.sleep_until(time.monotonic() + event.down_s)
        self._start(proc)

    def _away(self, event: Event) -> None:
        """A device SIGKILLed, the broker SIGKILLed while it is away, the device back
        soon after the broker (chaos.LEAD_S says why)."""
        device = self._device(event.device)
        if device is not None:
            device.kill()
            self.kills[Kind.DEVICE_SIGKILL.value] += 1
            _say(f"{event.kind.value}: {device.name} away; the broker goes in {event.lead_s:.1f} s")
            self.sleep_until(time.monotonic() + event.lead_s)
        broker = self.stack.role("broker")[0]
        broker.kill()
        self.kills[Kind.BROKER_SIGKILL.value] += 1
        self.kills[event.kind.value] += 1
        _say(f"{event.kind.value}: broker_sigkill {broker.name}; down {event.down_s:.1f} s")
        self.sleep_until(time.monotonic() + event.down_s)
        self._start(broker)
        if device is not None:
            self.sleep_until(time.monotonic() + event.back_s)
            device.start()

    def _target(self, event: Event) -> Proc | None:
        """The event's process; for a device already away, the next one that is up."""
        if event.kind.role != "device":
            return self.stack.role(event.kind.role)[event.target]
        return self._device(event.target)

    def _device(self, index: int) -> Proc | None:
        """Device ``index``, or the next one that is up when it is away; None if all are."""
        devices = self.fleet.procs()
        for i in range(len(devices)):
            proc = devices[(index + i) % len(devices)]
            if proc.alive():
                return proc
        return None

    def back(self) -> None:
        """Start every device still away (the sending phase is over)."""
        for _, proc in self.away:
            proc.start()
        self.away.clear()

    def _start(self, proc: Proc) -> None:
        proc.start()
        if any(proc is device for device in self.fleet.procs()):
            return  # a device needs nothing to be ready: its outbox waits for the link
        try:
            self.stack.wait_ready(proc)
        except SoakError:  # once more, then the soak gives up
            _say(f"{proc.name} did not come back; one more try")
            proc.kill()
            proc.start()
            self.stack.wait_ready(proc)


@dataclass(frozen=True)
class Options:
    devices: int
    rate: float
    duration: float
    messages: int
    settle: float
    counts: dict[Kind, int]
    keep: bool
    tmp: Path | None


def soak(name: str, options: Options, seed: int) -> dict[str, Any]:
    """Run one topology; its report (``error`` set when the harness could not go on)."""
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix=f"fieldchat-soak-{name}-", dir=options.tmp))
    registry = Registry()
    stack: Embedded | Scaled = (Embedded if name == "embedded" else Scaled)(root, registry)
    report: dict[str, Any] = {"topology": name, "devices": options.devices, "seed": seed}
    try:
        phases = report["setup_s"] = {}
        mark = time.monotonic()

        def phase(what: str) -> None:
            nonlocal mark
            phases[what] = round(time.monotonic() - mark, 1)
            mark = time.monotonic()

        _say(f"{name}: starting the stack in {root}")
        stack.start()
        phase("stack")
        fleet = Fleet(root, options.devices, registry, child_env())
        _say(f"{name}: {options.devices} devices: identities, credentials, conversations")
        fleet.create(stack, join=isinstance(stack, Scaled))
        phase("devices")
        stack.production([fleet.group, fleet.direct])
        phase("production")
        fleet.start(stack, rate=options.rate, cap=options.messages)
        phase("drivers")
        roles = {"device"} | {r for r in ("broker", "gateway") if stack.role(r)}
        counts = {k: n for k, n in options.counts.items() if k.role in roles}
        events = schedule(
            seed,
            start_s=options.duration * CHAOS_SPAN[0],
            end_s=options.duration * CHAOS_SPAN[1],
            counts=counts,
            targets={"broker": 1, "gateway": len(stack.role("gateway")), "device": options.devices},
        )
        chaos = Chaos(stack, fleet, registry)
        report["kills"] = chaos.kills
        report["graceful_exit_codes"] = chaos.graceful_exit_codes
        report["unexpected_exits"] = chaos.unexpected_exits
        _say(f"{name}: sending for {options.duration:g} s with {len(events)} chaos events")
        start = time.monotonic()
        fleet.go()
        for event in events:
            chaos.sleep_until(start + event.at)
            if time.monotonic() - start > options.duration:
                chaos.skipped += 1  # restarts ran late; the sending phase is over
                continue
            chaos.apply(event)
        chaos.sleep_until(start + options.duration)
        chaos.back()
        fleet.stop_sending()
        report["send_s"] = round(time.monotonic() - start, 1)
        report["skipped_events"] = chaos.skipped
        _say(f"{name}: sending stopped; settling (at most {options.settle:g} s)")
        report.update(_settle(stack, fleet, chaos, options.settle))
        for proc in fleet.procs():
            proc.stop(signal.SIGTERM, timeout=20)
        report.update(_verdict(stack, fleet))
    except SoakError as exc:
        report["error"] = str(exc)
        _say(f"{name}: {exc}")
    except Interrupted as exc:
        report["error"] = "the hard deadline passed" if str(exc) == "SIGALRM" else f"{exc}"
        _say(f"{name}: {report['error']}; stopping everything")
    finally:
        stack.stop()
        registry.stop_all()
        try:
            stack.cleanup()
        finally:
            if options.keep:
                report["kept"] = str(root)
            else:
                shutil.rmtree(root, ignore_errors=True)
        report["duration_s"] = round(time.monotonic() - began, 1)
        _say(f"{name}: done in {report['duration_s']:g} s")
    return report


def _settle(stack: Embedded | Scaled, fleet: Fleet, chaos: Chaos, limit: float) -> dict[str, Any]:
    """Wait until every screen shows every message and the archive holds them all, or
    the deadline; how long it took and whether it did."""
    began = time.monotonic()
    finals = None
    while finals is None and time.monotonic() - began < FINALS_TIMEOUT_S:
        chaos.sleep_until(time.monotonic() + 0.5)
        finals = fleet.finals()
    if finals is None:
        raise SoakError("the devices did not confirm they stopped sending (run/final/)")
    expected = [
        SentMessage(device, cid, n, 0, 0, 0, 0)
        for device, per_conv in finals.items()
        for cid, last in per_conv.items()
        for n in range(1, last + 1)
    ]
    assert fleet.identity is not None
    reader = ArchiveReader(stack.gateway_urls[0], fleet.identity, [fleet.group, fleet.direct])
    screens_done = archive_done = False
    while True:
        verdicts = check_screens(expected, fleet.members_of(), fleet.screens())
        screens_done = all(v.lost == 0 for v in verdicts.values())
        archive_done = reader.poll() and all(
            len(reader.texts[(cid, fleet.index[(cid, device)])]) >= last
            for device, per_conv in finals.items()
            for cid, last in per_conv.items()
        )
        if (screens_done and archive_done) or time.monotonic() - began > limit:
            break
        chaos.sleep_until(time.monotonic() + POLL_S)
    return {
        "settled": screens_done and archive_done,
        "settle_s": round(time.monotonic() - began, 1),
    }


def _verdict(stack: Embedded | Scaled, fleet: Fleet) -> dict[str, Any]:
    sent = fleet.sent()
    screens = check_screens(sent, fleet.members_of(), fleet.screens(), fleet.labels)
    assert fleet.identity is not None
    reader = read_archive(stack.gateway_urls, fleet.identity, [fleet.group, fleet.direct])
    archive = check_archive(sent, reader.rows, fleet.labels)
    by_device = Counter(m.device for m in sent)
    return {
        "sent": len(sent),
        "sent_by_device": dict(sorted(by_device.items())),
        "shown": sum(v.shown for v in screens.values()),
        "expected_shown": sum(v.expected for v in screens.values()),
        "lost": sum(v.lost for v in screens.values()),
        "duplicated": sum(v.duplicated for v in screens.values()),
        "out_of_order": sum(v.out_of_order for v in screens.values()),
        "unexpected": sum(v.unexpected for v in screens.values()),
        "screens": {name: v.to_json() for name, v in sorted(screens.items())},
        "archive_rows": archive.rows,
        "archive_missing": archive.missing,
        "archive_duplicates": archive.duplicates,
        "archive_unexpected": archive.unexpected,
        "archive": archive.to_json(),
    }


FAILURES = (
    "lost",
    "duplicated",
    "out_of_order",
    "unexpected",
    "archive_missing",
    "archive_duplicates",
    "archive_unexpected",
)


def passed(report: dict[str, Any]) -> bool:
    """Nothing lost, duplicated or out of order, the archive complete and exact."""
    if "skipped" in report:
        return True
    return "error" not in report and all(report.get(key) == 0 for key in FAILURES)


def _summary(report: dict[str, Any]) -> list[str]:
    name = report["topology"]
    if "skipped" in report:
        return [f"{name}: skipped ({report['skipped']})"]
    lines = [f"{name}: {report['devices']} devices, seed {report['seed']}"]
    if "sent" in report:
        kills = ", ".join(f"{k} {v}" for k, v in sorted(report.get("kills", {}).items())) or "none"
        lines += [
            f"  {report['sent']:,} messages accepted in {report.get('send_s', 0):g} s; "
            f"chaos: {kills}",
            f"  screens: {report['shown']:,} lines for {report['expected_shown']:,} expected; "
            f"lost {report['lost']}, duplicated {report['duplicated']}, "
            f"out of order {report['out_of_order']}, unexpected {report['unexpected']}",
            f"  archive: {report['archive_rows']:,} envelopes; missing {report['archive_missing']} "
            f"of {report['sent']:,} accepted, duplicates {report['archive_duplicates']}, "
            f"texts nobody accepted {report['archive_unexpected']}",
            f"  settled: {report.get('settled')} after {report.get('settle_s')} s; "
            f"unexpected exits: {len(report.get('unexpected_exits', []))}; "
            f"graceful stops' exit codes: {dict(report.get('graceful_exit_codes', {})) or '-'}",
        ]
        for device, screen in report["screens"].items():
            if screen.get("samples"):
                lines.append(f"  {device} e.g. {json.dumps(screen['samples'])}")
        if report["archive"].get("samples"):
            lines.append(f"  archive e.g. {json.dumps(report['archive']['samples'])}")
    if "error" in report:
        lines.append(f"  ERROR: {report['error']}")
    lines.append(f"  {'PASS' if passed(report) else 'FAIL'} in {report.get('duration_s')} s")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="the ≈ 2-minute soak of make test")
    parser.add_argument("--topology", choices=[*TOPOLOGIES, "both"], default="both")
    parser.add_argument("--seed", type=int, help="chaos schedule seed (default: random)")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--rate", type=float, help="texts/s per device and conversation")
    parser.add_argument("--duration", type=float, help="seconds of sending")
    parser.add_argument("--messages", type=int, default=0, help="cap per device and conversation")
    parser.add_argument("--settle", type=float, help="seconds allowed to settle after sending")
    parser.add_argument("--broker-kills", type=int)
    parser.add_argument(
        "--broker-away-kills", type=int, help="broker SIGKILLs while a device is away"
    )
    parser.add_argument("--broker-restarts", type=int, help="graceful (SIGTERM) restarts")
    parser.add_argument("--gateway-kills", type=int, help="scaled topology only")
    parser.add_argument("--device-kills", type=int)
    parser.add_argument("--device-restarts", type=int, help="graceful (SIGTERM) restarts")
    parser.add_argument("--deadline", type=float, help="hard limit for the whole run, seconds")
    parser.add_argument("--report-only", action="store_true", help="exit 0 whatever was found")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (logs, screens)")
    parser.add_argument("--tmp", type=Path, help="where the run folders go (default: $TMPDIR)")
    args = parser.parse_args()
    base = SHORT if args.short else LONG
    value = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    options = Options(
        devices=int(value["devices"]),
        rate=float(value["rate"]),
        duration=float(value["duration"]),
        messages=args.messages,
        settle=float(value["settle"]),
        counts={
            Kind.BROKER_SIGKILL: int(value["broker_kills"]),
            Kind.BROKER_SIGKILL_AWAY: int(value["broker_away_kills"]),
            Kind.BROKER_GRACEFUL: int(value["broker_restarts"]),
            Kind.GATEWAY_SIGKILL: int(value["gateway_kills"]),
            Kind.DEVICE_SIGKILL: int(value["device_kills"]),
            Kind.DEVICE_GRACEFUL: int(value["device_restarts"]),
        },
        keep=args.keep,
        tmp=args.tmp,
    )
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    names = TOPOLOGIES if args.topology == "both" else (args.topology,)
    deadline = args.deadline or len(names) * (
        SETUP_BUDGET_S + options.duration + options.settle + 120
    )

    stopping: list[str] = []

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        if not stopping:  # once: the cleanup that follows must not be interrupted
            stopping.append(signal.Signals(signum).name)
            raise Interrupted(signal.Signals(signum).name)

    # Our own handlers also mean children start with the default SIGINT action even when
    # this script was started with SIGINT ignored (a background job of a shell).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, interrupt)
    signal.alarm(int(deadline))
    reports = []
    _say(f"seed {seed}; topologies {', '.join(names)}; hard deadline {deadline:g} s")
    try:
        for name in names:
            if stopping:
                break
            reason = scaled_unavailable() if name == "scaled" else None
            if reason:
                reports.append({"topology": name, "skipped": reason})
                continue
            reports.append(soak(name, options, seed))
    except Interrupted as exc:  # between two topologies: nothing is running
        reports.append({"topology": "-", "error": str(exc)})
    finally:
        signal.alarm(0)
    ok = all(passed(r) for r in reports)
    for report in reports:
        if report.get("topology") in TOPOLOGIES:
            for line in _summary(report):
                print(line)
    print(json.dumps({"seed": seed, "short": args.short, "ok": ok, "topologies": reports}))
    if stopping and stopping[0] != "SIGALRM":
        return 130
    if any("error" in r for r in reports):
        return 2
    return 0 if ok or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
