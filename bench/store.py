"""The history store alone on SQLite (issue 15): what a commit and a page read cost.

* ``commit_cpu_us_per_env`` / ``commit_wall_us_per_env``: 20,000 signed envelopes
  committed in batches of ``--batch`` (1,000; a live stream's are a few to tens) (the
  process's CPU, every thread, and wall time, per envelope).
* ``page_median_ms`` / ``page_p99_ms``: 2,000 reads of a 50-envelope page, as a
  browser's scroll asks them, from the event loop (the store's own thread hop
  included).

Usage: python bench/store.py [--envelopes N] [--batch N] [--reads N]. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This folder's modules are named like the packages: import the package, not a file here.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fieldchat.gateway import ArchiveBatch, open_store
from fieldchat.gateway._store import NewEnvelope

CID = "a" * 26
PID = "c" * 26
PAGE = 50


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"envelopes": args.envelopes, "batch": args.batch, "reads": args.reads}
    with tempfile.TemporaryDirectory() as work:
        store = open_store(f"sqlite:///{work}/history.db")
        await store.migrate()
        template = os.urandom(110)
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, args.envelopes, args.batch):
            rows = [
                NewEnvelope(
                    cid=CID,
                    epoch=0,
                    sender=0,
                    sender_pid=PID,
                    chain=0,
                    step=i,
                    data=b"\x01\x81" + i.to_bytes(4, "big") + template,  # signed (flags byte)
                    received_at=time.time(),
                )
                for i in range(start, min(args.envelopes, start + args.batch))
            ]
            await store.commit(ArchiveBatch(envelopes=rows))
        out["commit_wall_us_per_env"] = round(
            (time.perf_counter() - wall) / args.envelopes * 1e6, 2
        )
        out["commit_cpu_us_per_env"] = round((time.process_time() - cpu) / args.envelopes * 1e6, 2)
        pages = max(1, args.envelopes // PAGE - 1)
        took: list[float] = []
        for i in range(args.reads):
            start = time.perf_counter()
            page = await store.history(CID, before=args.envelopes - (i % pages) * PAGE, limit=PAGE)
            took.append((time.perf_counter() - start) * 1e3)
            assert len(page) == PAGE
        took.sort()
        out["page_median_ms"] = round(statistics.median(took), 3)
        out["page_p99_ms"] = round(took[int(len(took) * 0.99)], 3)
        await store.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envelopes", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--reads", type=int, default=2_000)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
