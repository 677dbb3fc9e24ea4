"""A sensor on fieldchat, with the asyncio API (docs/device.md, "asyncio").

It posts a reading (this machine's load average) to every conversation it is a
member of every ``--interval`` seconds, and answers the commands members send it:
``read`` (a reading now), ``interval SECONDS`` (post more or less often), ``help``.
Anything else is left alone, so two sensors in one conversation do not talk forever.

    python examples/sensor.py --state sensor.db --broker mqtt://127.0.0.1:1883 \\
        --credential "$(fieldchat broker enroll --data-dir ./broker PID)"

(``fieldchat device --state sensor.db whoami`` prints the PID to enroll.) Invite it
from another device: ``fieldchat device conv create PID``; then ``send CID read``.
It stops on Ctrl-C or SIGTERM, or after ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from pydantic import SecretStr

from fieldchat.device import AsyncDevice, BrokerOptions, EventsDropped, MessageReceived, TlsOptions
from fieldchat.device.config import parse_broker_url
from fieldchat.schemas.errors import FieldchatError, NotAMember, UnknownConversation


def reading() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


class Sensor:
    """Posts readings and answers commands; the device does the rest (keys, outbox,
    reconnects): a reading sent while the broker is away leaves when it is back."""

    def __init__(self, device: AsyncDevice, interval: float) -> None:
        self.device = device
        self.interval = interval

    async def post_readings(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for conversation in await self.device.conversations():
                if conversation.member:
                    await self.post(conversation.cid, reading())

    async def answer_commands(self) -> None:
        async for event in self.device.events():
            if isinstance(event, MessageReceived):
                reply = self.command(event.text.split())
                if reply is not None:
                    await self.post(event.cid, reply)
            elif isinstance(event, EventsDropped):
                # We fell behind: commands that were not pushed are still stored.
                print(f"missed {event.messages} message(s) while busy", file=sys.stderr)

    async def post(self, cid: str, text: str) -> None:
        with contextlib.suppress(NotAMember, UnknownConversation):  # removed meanwhile
            await self.device.send(cid, text)

    def command(self, words: list[str]) -> str | None:
        match words:
            case ["read"]:
                return f"read: {reading()}"
            case ["interval", seconds] if _positive(seconds):
                self.interval = float(seconds)
                return f"interval: {self.interval:g} s"
            case ["help"]:
                return "help: read | interval SECONDS | help"
        return None


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


async def run(args: argparse.Namespace) -> None:
    host, port, tls = parse_broker_url(args.broker)
    broker = BrokerOptions(
        host=host,
        port=port,
        tls=TlsOptions() if tls else None,
        credential=SecretStr(args.credential) if args.credential else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a normal stop: close cleanly
        loop.add_signal_handler(sig, stop.set)
    async with AsyncDevice(args.state, broker) as device, asyncio.TaskGroup() as tasks:
        print(f"sensor {device.pid} running", flush=True)
        sensor = Sensor(device, args.interval)
        jobs = [
            tasks.create_task(sensor.post_readings()),
            tasks.create_task(sensor.answer_commands()),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
        for job in jobs:
            job.cancel()
    print("sensor stopped", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="a sensor that posts readings to fieldchat")
    parser.add_argument("--state", required=True, help="the sensor's state file")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--credential", default=os.environ.get("FIELDCHAT_CREDENTIAL"))
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between readings")
    parser.add_argument("--duration", type=float, default=None, help="stop after this long")
    args = parser.parse_args()
    status = 0
    try:
        asyncio.run(run(args))
    except* FieldchatError as errors:  # from the device, or from a task of the group
        print(f"sensor: {errors.exceptions[0]}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
