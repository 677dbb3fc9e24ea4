"""A device in its own process, for the failure tests (run: python tests/device/_peer.py …).

It sends ``PREFIX-0000`` … ``PREFIX-(N-1)`` (skipping what its state file says it
already queued, so a SIGKILLed sender resumes exactly where its durable state is),
prints every received text once as a JSON line (a cursor in the state file survives
restarts), and exits when it has sent everything, the broker acknowledged it and it
has printed ``--expect`` messages, or after ``--duration`` seconds (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pydantic import SecretStr

from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions, LinkOptions

_CURSOR = "peer_cursor"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--credential", required=True)
    parser.add_argument("--cid", required=True)
    parser.add_argument("--prefix", default="fc/v1")
    parser.add_argument("--send", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between batches")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--resend-after", type=float, default=1.0)
    parser.add_argument(
        "--await-receipts",
        action="store_true",
        help="exit only when every member receipted every message",
    )
    args = parser.parse_args()

    link = LinkOptions(
        keepalive_s=5,
        connect_timeout_s=3.0,
        backoff_min_s=0.1,
        backoff_max_s=1.0,
        receipt_interval_s=0.2,
        resend_after_s=args.resend_after,
    )
    broker = BrokerOptions(port=args.port, credential=SecretStr(args.credential))
    device = Device(args.state, broker, link=link, prefix=args.prefix)
    end = time.monotonic() + args.duration
    try:
        device.start()
        done = {s.text for s in device.sent(args.cid)}
        todo = [t for t in (f"{args.send}-{i:04d}" for i in range(args.count)) if t not in done]
        cursor = int(device.state.get_meta(_CURSOR) or 0)
        printed = int(device.state.get_meta(_CURSOR + "_n") or 0)
        while time.monotonic() < end:
            if todo:
                batch, todo = todo[: args.batch], todo[args.batch :]
                device.send_many(args.cid, batch)
                if args.pace:
                    time.sleep(args.pace)
            rows = device.messages(args.cid, after_id=cursor)
            for row in rows:
                sys.stdout.write(
                    json.dumps(
                        {
                            "sender": row.sender,
                            "text": row.text,
                            "step": row.step,
                            "epoch": row.epoch,
                        }
                    )
                    + "\n"
                )
                cursor = row.id
            if rows:
                sys.stdout.flush()
                printed += len(rows)
                device.state.set_meta({_CURSOR: str(cursor), _CURSOR + "_n": str(printed)})
            if (
                not todo
                and printed >= args.expect
                and not device.receipts_pending
                and not device.outbox()
                and not (args.await_receipts and device.undelivered(args.cid))
            ):
                return 0
            if not todo and not rows:
                device.wait_for(lambda: False, 0.05)
        sys.stderr.write(
            f"peer timed out: printed {printed}/{args.expect}, "
            f"{len(todo)} to send, {len(device.outbox())} in outbox\n"
        )
        return 1
    finally:
        device.close()


if __name__ == "__main__":
    sys.exit(main())
