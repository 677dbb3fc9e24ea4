"""A local, network-free walk through the protocol: what ``fieldchat demo --local`` prints.

Three participants (a Pi, a technician's laptop, a browser; all three with ML-KEM-768,
as browsers with WebCrypto ML-KEM have) form a conversation under the default policy
(post-quantum members only, every grant hybrid), exchange messages, and one is
removed; every step shows the bytes that would cross the broker, so a newcomer sees
what the broker can and cannot see.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fieldchat.device.engine import Engine, Publication
from fieldchat.device.identity import Identity
from fieldchat.schemas import Policy, TextMessage, TopicKind, Topics
from fieldchat.schemas.errors import FieldchatError

__all__ = ["run_local_demo"]


def run_local_demo(echo: Callable[[str], None] = print, *, pause: float = 0.0) -> dict[str, int]:
    """Run the demo, printing through ``echo``; return counts for scripts and tests."""
    names = {"pump-pi": True, "tech-laptop": True, "web-ana": True}
    engines = {n: Engine(Identity.generate(post_quantum=pq)) for n, pq in names.items()}
    by_pid = {e.pid: n for n, e in engines.items()}
    topics = Topics()
    for engine in engines.values():
        for other in engines.values():
            engine.learn_bundle(other.identity.bundle.to_bytes())

    echo("fieldchat local demo: three participants, no network; the broker's view is shown.\n")
    for name, engine in engines.items():
        kem = "X25519 + ML-KEM-768" if engine.identity.bundle.post_quantum else "X25519 only"
        echo(f"  {name:12s} pid {engine.pid}  ({kem})")
        echo(f"  {'':12s} fingerprint {engine.identity.fingerprint()}")

    def deliver(pubs: list[Publication]) -> int:
        count = 0
        queue = list(pubs)
        while queue:
            pub = queue.pop(0)
            topic = topics.parse(pub.topic)
            count += 1
            for engine in engines.values():
                try:
                    # A proposed roster reaches everyone once a verifier retains it.
                    if topic.kind in (TopicKind.ROSTER, TopicKind.PROPOSE):
                        queue += engine.handle_roster(pub.payload)
                    elif topic.kind is TopicKind.INBOX and topic.pid == engine.pid:
                        result = engine.handle_inbox(pub.payload)
                        queue += result if isinstance(result, list) else []
                except FieldchatError:
                    continue  # e.g. a removed member ignoring the roster that removes it
        return count

    pi, laptop, web = engines["pump-pi"], engines["tech-laptop"], engines["web-ana"]
    cid, pubs = pi.create_conversation([laptop.pid, web.pid], policy=Policy())
    delivered = deliver(pubs)
    echo(
        f"\npump-pi creates conversation {cid}: {delivered} publications (roster + grants;"
        " post-quantum members only, every grant X25519 + ML-KEM-768)"
    )

    def say(sender: Engine, text: str) -> None:
        envelope = sender.seal(cid, TextMessage(sent_at=int(time.time()), text=text))
        echo(f"\n{by_pid[sender.pid]} -> {len(envelope)} bytes on {topics.msg(cid)}")
        echo(f"  broker sees: {envelope[:12].hex()}… (header, ciphertext, signature)")
        for name, engine in engines.items():
            if engine is sender:
                continue
            try:
                opened = engine.open(cid, envelope)
            except FieldchatError as exc:
                echo(f"  {name:12s} cannot read it ({type(exc).__name__})")
                continue
            if opened is not None and isinstance(opened.message, TextMessage):
                signer = by_pid[opened.sender]
                echo(f"  {name:12s} reads {opened.message.text!r} (signed by {signer})")
        time.sleep(pause)

    say(pi, "Pump 3 pressure 4.2 bar, valve B closed.")
    say(laptop, "On my way, back on site at 14:30.")
    say(web, "Thanks both, logged it.")
    delivered = deliver(pi.remove_members(cid, [web.pid]))
    echo(f"\npump-pi removes web-ana: new epoch {pi.roster(cid).epoch}, {delivered} publications")
    say(laptop, "Valve B reopened (web-ana no longer in the conversation).")
    return {"members": len(pi.roster(cid).members), "epoch": pi.roster(cid).epoch}
