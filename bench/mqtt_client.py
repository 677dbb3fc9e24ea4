"""The gateway archiver client's receive path, alone: µs per PUBLISH parsed.

Feeds a stream of QoS 1 PUBLISH packets (256-byte payloads, a 38-byte topic, as an
archived envelope arrives) to ``gateway._mqtt._Protocol.data_received`` in 64 KiB
chunks (one ``recv()`` each), then takes them, as the archiver does; prints one JSON
object on its last line: ``{"us_per_publish_v311": …, "us_per_publish_v5": …}``.
Each figure is the median of ``--rounds`` rounds of ``--count`` messages.

    .venv/bin/python bench/mqtt_client.py [--count 50000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fieldchat.gateway._mqtt import MqttClient, _Protocol

TOPIC = "fc/v1/c/" + "a" * 26 + "/msg"
CHUNK = 65536


class _Transport:
    def abort(self) -> None:
        raise AssertionError("the benchmark stream is well formed")

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _stream(count: int, *, v5: bool) -> bytes:
    topic = TOPIC.encode()
    out = bytearray()
    for i in range(count):
        mid = i % 65535 + 1
        body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")
        if v5:
            body += b"\x00"
        body += bytes([i & 0xFF]) * 256
        size = len(body)
        out += bytes([0x32, (size & 0x7F) | 0x80, size >> 7]) + body
    return bytes(out)


def _round(stream: bytes, count: int, *, v5: bool) -> float:
    client = MqttClient("127.0.0.1", 1, client_id="bench", protocol="5" if v5 else "3.1.1")
    client.inbox_max = count + 1
    protocol = _Protocol(client)
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    got = 0
    start = time.perf_counter()
    for at in range(0, len(stream), CHUNK):
        protocol.data_received(stream[at : at + CHUNK])
        got += len(client.take(1000))
    got += len(client.take(count))
    elapsed = time.perf_counter() - start
    assert got == count, got
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    result = {}
    for v5 in (False, True):
        stream = _stream(args.count, v5=v5)
        rounds = [_round(stream, args.count, v5=v5) for _ in range(args.rounds)]
        result["us_per_publish_v5" if v5 else "us_per_publish_v311"] = round(
            statistics.median(rounds), 3
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
