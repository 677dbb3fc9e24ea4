"""What one membership change costs on the wire and in CPU, through the engine.

For a group of N members (N = 2, 10, 50, 200) it measures, with real engines and real
keys (nothing stubbed), everything published because of one change until the group is
quiet again: the roster proposal, the earlier rosters sent to a new member's inbox,
every grant, anything else an engine returns. Bytes are topic + payload of each
PUBLISH (the default ``fc/v1`` prefix), counted once as published; the broker's fan-out
to subscribers and the verifier's retained copy of the roster (one more roster) are
not counted, as they are not per-member costs of the protocol. CPU is this process's
CPU time (``time.process_time``) for the whole change: the admin issuing the roster
and every member processing it, its grants out and everyone else's in.

- ``membership_bytes_nN``, ``membership_cpu_ms_nN``: one member added to a group of N
  (N + 1 members afterwards).
- ``membership_remove_bytes_nN``, ``membership_remove_cpu_ms_nN``: one member (not the
  admin) removed from a group of N (N - 1 afterwards).
- ``v1_*``: the same for protocol v1 (PROTOCOL.md §6.1: every remaining member grants
  a new chain to every other member, n(n-1) grants). This code *is* v1, so they equal
  the measured figures for the sizes measured; ``v1_model_*`` is the closed form
  (roster + earlier rosters + n(n-1) x mean grant publication) from the sizes
  measured at the largest N run, which must match the measurement and gives the
  sizes not run.
- ``membership_*_publications_nN``: how many PUBLISHes.

N = 200 on v1 means 40,200 hybrid grants made and opened for one addition (and as
many to set the group up): by default it is not run but given by the model
(``membership_n200_source`` says which; ``--max-n 200`` runs it).

Usage: python bench/membership.py [--sizes 2,10,50,200] [--max-n 50]
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
    Member,
    Policy,
    Roster,
    TopicKind,
    Topics,
    cid_for,
)
from fieldchat.schemas.errors import RosterPending


@dataclass
class Traffic:
    """What one change put on the wire."""

    publications: int = 0
    bytes: int = 0
    grants: int = 0
    grant_bytes: int = 0  # topic + payload of the inbox grants alone
    rosters: int = 0
    roster_bytes: int = 0
    cpu_s: float = 0.0

    def count(self, pub: Publication, kind: TopicKind) -> None:
        size = len(pub.topic.encode()) + len(pub.payload)
        self.publications += 1
        self.bytes += size
        if kind is TopicKind.INBOX and pub.payload[1:2] == b"\x10":  # a grant (§5.3)
            self.grants += 1
            self.grant_bytes += size
        else:
            self.rosters += 1
            self.roster_bytes += size


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
                        if isinstance(result, list):
                            queue += result
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


def v1_model(
    n: int, *, grant_pub: float, history: int, roster_pub: dict[int, int]
) -> tuple[int, int]:
    """v1 bytes (add, remove) for a group of n from measured sizes (PROTOCOL.md §6.1):
    the roster of the new epoch, on an addition the earlier roster (``history``: epoch
    0 here) to the new member's inbox, and a grant from every member to every other."""
    add = roster_pub[n + 1] + history + round((n + 1) * n * grant_pub)
    remove = roster_pub[n - 1] + round((n - 1) * (n - 2) * grant_pub)
    return add, remove


def roster_publication_bytes(n: int, epoch: int, policy: Policy) -> int:
    """Topic + payload of the proposal of an n-member roster of ``epoch`` (epoch 0
    carries the 16-byte nonce, later ones the 32-byte digest of the one before)."""
    identities = [Identity.generate() for _ in range(n)]
    admin = identities[0]
    nonce = bytes(16) if epoch == 0 else b""
    roster = Roster.create(
        cid=cid_for(admin.pid, bytes(16)),
        epoch=epoch,
        nonce=nonce,
        prev=b"" if epoch == 0 else bytes(32),
        members=tuple(Member(pid=i.pid, admin=i is admin, pq=True) for i in identities),
        policy=policy,
        issued_at=int(time.time()),
        signer_key=admin.public,
        sign=admin.sign,
    )
    return len(Topics().propose(roster.cid).encode()) + len(roster.to_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,10,50,200")
    parser.add_argument("--max-n", type=int, default=50, help="run v1 up to this N; model above")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    policy = Policy()  # the default: sign every envelope, hybrid grants required
    results: dict[str, float | int | str] = {}
    measured: dict[int, tuple[Traffic, Traffic]] = {}
    for n in sizes:
        if n > args.max_n:
            continue
        started = time.monotonic()
        add = Group(n, policy=policy).add_one()
        remove = Group(n, policy=policy).remove_one()
        measured[n] = (add, remove)
        for label, traffic in (("", add), ("remove_", remove)):
            results[f"membership_{label}bytes_n{n}"] = traffic.bytes
            results[f"membership_{label}publications_n{n}"] = traffic.publications
            results[f"membership_{label}cpu_ms_n{n}"] = round(traffic.cpu_s * 1e3, 1)
            results[f"v1_membership_{label}bytes_n{n}"] = traffic.bytes
            results[f"v1_membership_{label}cpu_ms_n{n}"] = round(traffic.cpu_s * 1e3, 1)
        print(
            f"n={n}: add {add.publications} pubs {add.bytes} B {add.cpu_s * 1e3:.0f} ms; "
            f"remove {remove.publications} pubs {remove.bytes} B {remove.cpu_s * 1e3:.0f} ms "
            f"({time.monotonic() - started:.1f} s wall)",
            file=sys.stderr,
        )
    # The v1 closed form from the largest run's sizes, checked against every run.
    largest = max(measured)
    add_l, remove_l = measured[largest]
    grant_pub = (add_l.grant_bytes + remove_l.grant_bytes) / (add_l.grants + remove_l.grants)
    grant_cpu_ms = (add_l.cpu_s + remove_l.cpu_s) * 1e3 / (add_l.grants + remove_l.grants)
    results["v1_grant_publication_bytes"] = round(grant_pub, 1)
    results["v1_grant_cpu_ms"] = round(grant_cpu_ms, 3)  # made + opened, per grant
    for n in sizes:
        add_b, remove_b = v1_model(
            n,
            grant_pub=grant_pub,
            history=roster_publication_bytes(n, 0, policy),
            roster_pub={m: roster_publication_bytes(m, 1, policy) for m in (n - 1, n + 1)},
        )
        results[f"v1_model_membership_bytes_n{n}"] = add_b
        results[f"v1_model_membership_remove_bytes_n{n}"] = remove_b
        if n not in measured:
            # Not run: the model, CPU scaled by the number of grants (n(n±1)).
            results[f"membership_n{n}_source"] = "model"
            results[f"membership_bytes_n{n}"] = add_b
            results[f"membership_remove_bytes_n{n}"] = remove_b
            results[f"v1_membership_bytes_n{n}"] = add_b
            results[f"v1_membership_remove_bytes_n{n}"] = remove_b
            results[f"v1_membership_cpu_ms_n{n}"] = round((n + 1) * n * grant_cpu_ms)
            results[f"v1_membership_remove_cpu_ms_n{n}"] = round((n - 1) * (n - 2) * grant_cpu_ms)
            results[f"membership_cpu_ms_n{n}"] = results[f"v1_membership_cpu_ms_n{n}"]
            results[f"membership_remove_cpu_ms_n{n}"] = results[f"v1_membership_remove_cpu_ms_n{n}"]
        else:
            results[f"membership_n{n}_source"] = "measured"
    results["protocol"] = "v1"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
