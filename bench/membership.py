"""What one membership change costs on the wire and in CPU, through the engine.

For a group of N members (N = 2, 10, 50, 200) it measures, with real engines and real
keys (nothing stubbed), everything published because of one change until the group is
quiet again: the roster proposal, the earlier rosters sent to a new member's inbox,
every epoch-secret delivery, every control (a new member's JOINED, §6.6; ENDS, §6.5),
anything else an engine returns. Bytes are topic + payload of each PUBLISH (the default
``fc/v1`` prefix),
counted once as published; the broker's fan-out to subscribers and the verifier's
retained copy of the roster (one more roster) are not counted, as they are not
per-member costs of the protocol. CPU is this process's CPU time
(``time.process_time``) for the whole change: the admin issuing the roster and its
deliveries and every member processing what reaches it.

- ``membership_bytes_nN``, ``membership_cpu_ms_nN``: one member added to a group of N
  (N + 1 members afterwards).
- ``membership_remove_bytes_nN``, ``membership_remove_cpu_ms_nN``: one member (not the
  admin) removed from a group of N (N - 1 afterwards), default policy (every envelope
  signed: no ENDS control is due).
- ``membership_remove_bytes_nN_sign4``: the same under ``sign_every = 4``, where every
  remaining member states its chain ends in a signed ENDS control (§6.5).
- ``membership_*_publications_nN``: how many PUBLISHes.
- ``v1_*``: protocol v1 (every remaining member granted a new chain to every other
  member: n(n-1) hybrid grants), measured through v1's engine at 3e91f83 for N = 2, 10,
  50 (``V1_MEASURED``) and for other N from its closed form (roster + earlier roster +
  n(n-1) x 1,417 bytes; 0.795 ms of CPU per grant), which matched the measured runs
  within 0.01 %.

Usage: python bench/membership.py [--sizes 2,10,50,200]
Prints one JSON object on its last line (issue 16; results in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# bench/device.py would shadow the ``device`` package: import from the project root.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fieldchat.device.engine import Engine, Publication
from fieldchat.device.identity import Identity
from fieldchat.schemas import (
    FieldchatError,
    Policy,
    TopicKind,
    Topics,
)
from fieldchat.schemas.delivery import is_delivery
from fieldchat.schemas.errors import RosterPending

# Protocol v1 through its engine at 3e91f83 (bench/membership.py, 4 Dec 15:40 UTC):
# N -> (add bytes, add CPU ms, remove bytes, remove CPU ms).
V1_MEASURED = {
    2: (9_053, 6.7, 245, 0.4),
    10: (156_853, 102.0, 102_501, 68.4),
    50: (3_616_497, 2_346.6, 3_334_423, 1_548.3),
}
V1_GRANT_PUBLICATION_BYTES = 1_417.0  # topic + payload of one hybrid v1 grant
V1_GRANT_CPU_MS = 0.795  # made and opened
# v1 roster publication = 216 + 29 bytes per member (epoch >= 1; epoch 0: 16 fewer).
V1_ROSTER_BYTES, V1_ROSTER_MEMBER_BYTES = 216, 29


def v1_figures(n: int) -> tuple[int, float, int, float]:
    """v1's (add bytes, add CPU ms, remove bytes, remove CPU ms) for a group of n."""
    if n in V1_MEASURED:
        return V1_MEASURED[n]
    roster = V1_ROSTER_BYTES + V1_ROSTER_MEMBER_BYTES * (n + 1)
    history = V1_ROSTER_BYTES - 16 + V1_ROSTER_MEMBER_BYTES * n
    removed = V1_ROSTER_BYTES + V1_ROSTER_MEMBER_BYTES * (n - 1)
    add_grants, remove_grants = (n + 1) * n, (n - 1) * (n - 2)
    return (
        round(roster + history + add_grants * V1_GRANT_PUBLICATION_BYTES),
        round(add_grants * V1_GRANT_CPU_MS, 1),
        round(removed + remove_grants * V1_GRANT_PUBLICATION_BYTES),
        round(remove_grants * V1_GRANT_CPU_MS, 1),
    )


@dataclass
class Traffic:
    """What one change put on the wire."""

    publications: int = 0
    bytes: int = 0
    deliveries: int = 0
    delivery_bytes: int = 0  # topic + payload of the inbox deliveries alone
    controls: int = 0
    control_bytes: int = 0  # envelopes on c/{cid}/msg (ENDS controls)
    cpu_s: float = 0.0

    def count(self, pub: Publication, kind: TopicKind) -> None:
        size = len(pub.topic.encode()) + len(pub.payload)
        self.publications += 1
        self.bytes += size
        if kind is TopicKind.INBOX and is_delivery(pub.payload):
            self.deliveries += 1
            self.delivery_bytes += size
        elif kind is TopicKind.MSG:
            self.controls += 1
            self.control_bytes += size


class Group:
    """Engines routed in memory as a broker would: rosters (proposed, then retained by
    a verifier) to every member, inbox payloads to their addressee, until quiet."""

    def __init__(self, size: int, *, policy: Policy) -> None:
        self.topics = Topics()
        self.engines = [Engine(Identity.generate()) for _ in range(size)]
        self.bundles = [e.identity.bundle.to_bytes() for e in self.engines]
        for engine in self.engines:
            for bundle in self.bundles:
                engine.learn_bundle(bundle)
        self.by_pid = {e.pid: e for e in self.engines}
        admin = self.engines[0]
        self.cid, pubs = admin.create_conversation([e.pid for e in self.engines[1:]], policy=policy)
        self.route(pubs, Traffic())

    @property
    def admin(self) -> Engine:
        return self.engines[0]

    def route(self, publications: Iterable[Publication], traffic: Traffic) -> None:
        queue = list(publications)
        while queue:
            pub = queue.pop(0)
            topic = self.topics.parse(pub.topic)
            traffic.count(pub, topic.kind)
            if topic.kind in (TopicKind.ROSTER, TopicKind.PROPOSE):
                targets = self.engines
            elif topic.kind is TopicKind.INBOX and topic.pid in self.by_pid:
                targets = [self.by_pid[topic.pid]]
            else:
                targets = []
            for engine in targets:
                if engine is self.admin and topic.kind is TopicKind.PROPOSE:
                    continue  # its own proposal, adopted when it issued it
                try:
                    if topic.kind is TopicKind.INBOX:
                        result = engine.handle_inbox(pub.payload)
                        queue += result if isinstance(result, list) else result.publications
                    else:
                        queue += engine.handle_roster(pub.payload)
                except RosterPending:
                    pass  # a newcomer holds it until its inbox brings the epochs before
                except FieldchatError as exc:
                    raise SystemExit(f"{engine.pid}: {exc!r} on {pub.topic}") from exc

    def add_one(self) -> Traffic:
        """A new participant (bundle known to all, as its retained bundle would be)."""
        newcomer = Engine(Identity.generate())
        bundle = newcomer.identity.bundle.to_bytes()
        for engine in self.engines:
            engine.learn_bundle(bundle)
        for other in self.bundles:
            newcomer.learn_bundle(other)
        self.engines.append(newcomer)
        self.by_pid[newcomer.pid] = newcomer
        traffic = Traffic()
        start = time.process_time()
        self.route(self.admin.add_members(self.cid, [newcomer.pid]), traffic)
        traffic.cpu_s = time.process_time() - start
        self._check(len(self.engines))
        return traffic

    def remove_one(self) -> Traffic:
        gone = self.engines[-1]
        traffic = Traffic()
        start = time.process_time()
        self.route(self.admin.remove_members(self.cid, [gone.pid]), traffic)
        traffic.cpu_s = time.process_time() - start
        assert not gone.is_member(self.cid)
        self._check(len(self.engines) - 1)
        return traffic

    def _check(self, members: int) -> None:
        """Everyone left entered the new epoch and can read everyone else."""
        epoch = self.admin.roster(self.cid).epoch
        current = [e for e in self.engines if e.is_member(self.cid)]
        assert len(current) == members, (len(current), members)
        for engine in current:
            assert engine.roster(self.cid).epoch == epoch
            assert not engine.owed_grants(self.cid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,10,50,200")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    policy = Policy()  # the default: sign every envelope
    results: dict[str, float | int | str] = {"protocol": "v2"}
    for n in sizes:
        started = time.monotonic()
        add = Group(n, policy=policy).add_one()
        remove = Group(n, policy=policy).remove_one()
        remove4 = Group(n, policy=Policy(sign_every=4)).remove_one()
        for label, traffic in (("", add), ("remove_", remove)):
            results[f"membership_{label}bytes_n{n}"] = traffic.bytes
            results[f"membership_{label}publications_n{n}"] = traffic.publications
            results[f"membership_{label}cpu_ms_n{n}"] = round(traffic.cpu_s * 1e3, 1)
        results[f"membership_remove_bytes_n{n}_sign4"] = remove4.bytes
        results[f"membership_remove_ends_controls_n{n}_sign4"] = remove4.controls
        v1_add, v1_add_cpu, v1_remove, v1_remove_cpu = v1_figures(n)
        results[f"v1_membership_bytes_n{n}"] = v1_add
        results[f"v1_membership_cpu_ms_n{n}"] = v1_add_cpu
        results[f"v1_membership_remove_bytes_n{n}"] = v1_remove
        results[f"v1_membership_remove_cpu_ms_n{n}"] = v1_remove_cpu
        results[f"v1_n{n}_source"] = "measured" if n in V1_MEASURED else "model"
        if add.deliveries:
            results[f"delivery_publication_bytes_n{n}"] = round(
                add.delivery_bytes / add.deliveries, 1
            )
        print(
            f"n={n}: add {add.publications} pubs {add.bytes} B {add.cpu_s * 1e3:.0f} ms; "
            f"remove {remove.publications} pubs {remove.bytes} B {remove.cpu_s * 1e3:.0f} ms; "
            f"remove (sign_every 4) {remove4.bytes} B, {remove4.controls} ENDS "
            f"({time.monotonic() - started:.1f} s wall)",
            file=sys.stderr,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
