"""The soak's devices: set up through ``fieldchat device …`` and
``fieldchat broker enroll`` as a user does, then each run by the driver
(``bench/_soak/driver.py``), and read back at the end from their state files."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from bench._soak.check import ArchivedEnvelope, ScreenLine, SentMessage, parse_screen
from bench._soak.procs import FIELDCHAT, Proc, Registry, SoakError, run, wait_until
from fieldchat.device.client import Device
from fieldchat.device.history import GatewayHistory
from fieldchat.device.identity import Identity
from fieldchat.schemas.envelope import EnvelopeKind, read_header
from fieldchat.schemas.errors import FieldchatError

__all__ = ["ArchiveReader", "Fleet", "Member", "Topology"]

DRIVER = Path(__file__).with_name("driver.py")
SETUP_PARALLEL = 4  # CLI processes at once during setup (each ≈ 1 s of CPU to start)
JOIN_TRIES = 5
JOIN_LISTEN = ("listen", "--json", "--duration", "5")
T = TypeVar("T")


class Topology(Protocol):
    name: str

    @property
    def broker_data(self) -> Path: ...

    def setup_flags(self) -> list[str]: ...

    def device_flags(self, index: int) -> list[str]: ...


@dataclass
class Member:
    name: str
    state: Path
    pid: str = ""
    convs: list[str] = field(default_factory=list)
    proc: Proc | None = None


def _parallel(fn: Callable[[Member], T], members: Iterable[Member]) -> list[T]:
    with ThreadPoolExecutor(SETUP_PARALLEL) as pool:
        return list(pool.map(fn, members))


class Fleet:
    """N devices in one group conversation (founded by d0) and one 1:1 (d1 with d0)."""

    def __init__(self, root: Path, count: int, registry: Registry, env: dict[str, str]) -> None:
        if count < 2:
            raise SoakError("the soak needs at least 2 devices")
        self.root = root
        self.registry = registry
        self.env = env
        self.members = [Member(f"d{i}", root / "devices" / f"d{i}.db") for i in range(count)]
        self.group = ""
        self.direct = ""
        self.identity: Identity | None = None  # d0's: a member of both, reads the archive
        self.index: dict[tuple[str, str], int] = {}  # (cid, device) -> sender index

    @property
    def labels(self) -> dict[str, str]:
        return {self.group: "group", self.direct: "direct"}

    def members_of(self) -> dict[str, list[str]]:
        return {
            cid: [m.name for m in self.members if cid in m.convs]
            for cid in (self.group, self.direct)
        }

    def _cli(self, member: Member, *args: str, env: dict[str, str] | None = None) -> str:
        argv = [*FIELDCHAT, "device", "--state", str(member.state), *args]
        return run(argv, env=env or self.env, what=f"{member.name}: device {args[-1]}")

    # -- setup ----------------------------------------------------------------------------

    def create(self, topology: Topology, *, join: bool) -> None:
        """Identities, broker credentials, registration and the two conversations;
        with ``join``, every invitee joined too (it has received its grant and the
        roster: needed before the devices move to another broker). Without, each
        device joins when its driver starts (``start`` waits for that)."""
        flags = topology.setup_flags()
        (self.root / "devices").mkdir(parents=True, exist_ok=True)

        def register(member: Member) -> None:
            member.pid = json.loads(self._cli(member, "init", "--json"))["pid"]
            credential = run(
                [
                    *FIELDCHAT,
                    "broker",
                    "enroll",
                    "--data-dir",
                    str(topology.broker_data),
                    member.pid,
                ],
                env=self.env,
                what="broker enroll",
            ).strip()
            env = {**self.env, "FIELDCHAT_CREDENTIAL": credential}  # not in process lists
            self._cli(member, *flags, "init", "--json", env=env)

        _parallel(register, self.members)
        first, second, *_ = self.members
        others = [m.pid for m in self.members[1:]]
        self.group = json.loads(self._cli(first, *flags, "conv", "create", *others, "--json"))[
            "cid"
        ]
        self.direct = json.loads(self._cli(second, *flags, "conv", "create", first.pid, "--json"))[
            "cid"
        ]
        for member in self.members:
            member.convs = [self.group] + ([self.direct] if member in (first, second) else [])

        if join:
            self._exchange_keys(flags)
        # Sender indexes from the founders' rosters (the invitees may not have them yet).
        for founder, cid in ((first, self.group), (second, self.direct)):
            device = Device(founder.state)
            try:
                roster = device.engine.roster(cid)
                for member in self.members:
                    if cid in member.convs:
                        self.index[(cid, member.name)] = roster.index_of(member.pid)
                if founder is first:
                    self.identity = device.engine.identity
            finally:
                device.close()

    def _exchange_keys(self, flags: list[str]) -> None:
        """Run ``listen`` briefly on the devices that lack something until each is a
        member of its conversations, holds every other member's chain key and has
        published everything it owes (its grants). What a broker still queues for a
        device is lost when the devices move to another broker; after this, nothing
        that matters is.

        Raises:
            SoakError: not within JOIN_TRIES rounds.
        """
        for _ in range(JOIN_TRIES):
            waiting = [m for m in self.members if not _keyed(m)]
            if not waiting:
                return
            # All at once: grants a joining member publishes reach the others live.
            with ThreadPoolExecutor(len(self.members)) as pool:
                list(pool.map(lambda m: self._cli(m, *flags, *JOIN_LISTEN), self.members))
        raise SoakError(f"{[m.name for m in waiting]} did not join or receive every key")

    # -- the drivers ----------------------------------------------------------------------

    def start(self, topology: Topology, *, rate: float, cap: int) -> None:
        """One driver per device; returns once each is connected and a member."""
        for i, member in enumerate(self.members):
            env = {
                **self.env,
                "SOAK_NAME": member.name,
                "SOAK_DIR": str(self.root / "run"),
                "SOAK_CONVS": ",".join(member.convs),
                "SOAK_RATE": str(rate),
                "SOAK_MAX": str(cap),
            }
            argv = [
                sys.executable,
                str(DRIVER),
                "device",
                "--state",
                str(member.state),
                *topology.device_flags(i),
                "listen",
                "--json",
            ]
            member.proc = self.registry.add(
                Proc(
                    member.name,
                    argv,
                    self.root / "logs" / f"{member.name}.log",
                    stdout=self.screen(member),
                    env=env,
                )
            )
            member.proc.start()
        ready = self.root / "run" / "ready"
        wait_until(
            lambda: (
                all((ready / m.name).exists() for m in self.members)
                or any(m.proc and not m.proc.alive() for m in self.members)
            ),
            120,
            "every device to connect and join",
        )
        for member in self.members:
            if member.proc is not None and not member.proc.alive():
                raise SoakError(f"{member.name} exited at start: {member.proc.tail()}")

    def procs(self) -> list[Proc]:
        return [m.proc for m in self.members if m.proc is not None]

    def screen(self, member: Member) -> Path:
        return self.root / "screens" / f"{member.name}.jsonl"

    def go(self) -> None:
        (self.root / "run" / "go").touch()

    def stop_sending(self) -> None:
        (self.root / "run" / "stop").touch()

    def finals(self) -> dict[str, dict[str, int]] | None:
        """Each device's last ``n`` per conversation, once all have stopped sending."""
        out = {}
        for member in self.members:
            path = self.root / "run" / "final" / f"{member.name}.json"
            if not path.exists():
                return None
            out[member.name] = json.loads(path.read_text())
        return out

    def screens(self) -> dict[str, tuple[list[ScreenLine], int]]:
        out = {}
        for member in self.members:
            try:
                with self.screen(member).open(errors="replace") as lines:
                    out[member.name] = parse_screen(lines)
            except FileNotFoundError:
                out[member.name] = ([], 0)
        return out

    def sent(self) -> list[SentMessage]:
        """What every sender accepted, from its state file (the drivers have stopped)."""
        out = []
        for member in self.members:
            prefix = f"soak {member.name} "
            device = Device(member.state)
            try:
                for row in device.sent():
                    if row.text.startswith(prefix):
                        index = self.index[(row.cid, member.name)]
                        n = int(row.text[len(prefix) :])
                        out.append(
                            SentMessage(
                                member.name, row.cid, n, row.epoch, index, row.chain, row.step
                            )
                        )
            finally:
                device.close()
        return out


def _keyed(member: Member) -> bool:
    """Member of its conversations, each other member's chain known (chain 0: the
    first of epoch 0, which is all a fresh conversation has), nothing owed or queued."""
    device = Device(member.state)
    try:
        engine = device.engine
        for cid in member.convs:
            if not engine.is_member(cid) or engine.owed_grants(cid):
                return False
            roster = engine.roster(cid)
            for index, pid in enumerate(roster.pids):
                if pid != member.pid and engine.next_step(cid, roster.epoch, index, 0) is None:
                    return False
        return not device.outbox()
    finally:
        device.close()


class ArchiveReader:
    """The archive as the gateway's history API serves it to a member (d0), read
    incrementally: each ``poll`` fetches only what was archived since the last."""

    def __init__(self, base_url: str, identity: Identity, cids: list[str]) -> None:
        self.history = GatewayHistory(base_url, identity)
        self.cids = cids
        self.rows: list[ArchivedEnvelope] = []
        self.texts: dict[tuple[str, int], set[tuple[int, int, int]]] = defaultdict(set)
        self.errors = 0

    def poll(self) -> bool:
        """Fetch what is new; False when the gateway did not answer."""
        try:
            for cid in self.cids:
                while True:
                    envelopes = self.history.conversation(cid)
                    for data in envelopes:
                        self._add(cid, data)
                    if len(envelopes) < 20_000:  # device.history: 40 pages of 500 a call
                        break
        except FieldchatError:
            self.errors += 1
            return False
        return True

    def _add(self, cid: str, data: bytes) -> None:
        h = read_header(data)
        self.rows.append(ArchivedEnvelope(cid, int(h.kind), h.epoch, h.sender, h.chain, h.step))
        if h.kind == EnvelopeKind.TEXT:
            self.texts[(cid, h.sender)].add((h.epoch, h.chain, h.step))


def read_archive(base_urls: list[str], identity: Identity, cids: list[str]) -> ArchiveReader:
    """The whole archive, from the first gateway that answers (bounded).

    Raises:
        SoakError: no gateway answered within a minute.
    """
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for url in base_urls:
            reader = ArchiveReader(url, identity, cids)
            if reader.poll():
                return reader
        time.sleep(1)
    raise SoakError(f"no gateway answered history requests ({', '.join(base_urls)})")
