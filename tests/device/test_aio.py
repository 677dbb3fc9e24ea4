"""``AsyncDevice`` against a real broker on 127.0.0.1: the asyncio shape over the
synchronous device (docs/device.md, "asyncio")."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from fieldchat.device import AsyncDevice, EventStream
from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions
from fieldchat.device.events import (
    Connected,
    Disconnected,
    EventsDropped,
    Joined,
    MessageReceived,
    PresenceChanged,
    ReceiptReceived,
    Removed,
    StreamEvent,
)
from fieldchat.schemas.errors import (
    ConfigError,
    ConnectFailed,
    FieldchatError,
    InvalidId,
    NotAuthorized,
    UnknownConversation,
    UnknownParticipant,
)
from tests.device.conftest import FAST, Broker, Mosquitto, free_port

pytestmark = pytest.mark.mosquitto


def async_device(broker: Broker, tmp_path: Path, name: str) -> AsyncDevice:
    """An AsyncDevice whose pid the broker knows (learned from a first open)."""
    path = tmp_path / f"{name}.sqlite3"
    probe = Device(path)
    pid = probe.pid
    probe.close()
    return AsyncDevice(path, broker.options(pid), link=FAST)


async def next_of(
    stream: EventStream, kind: type[StreamEvent], where: Callable[..., bool] = lambda _: True
) -> StreamEvent:
    """The next event of ``kind`` (others skipped), within 15 s."""
    async with asyncio.timeout(15):
        async for event in stream:
            if isinstance(event, kind) and where(event):
                return event
    raise AssertionError(f"the stream ended before a {kind.__name__}")


async def until(predicate: Callable[[], object], what: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def writer_is_in_send() -> bool:
    """Whether the AsyncDevice's writer thread is inside ``Device._queue`` (send, send_many) now."""
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or 0) if thread.name.startswith("fieldchat-aio_") else None
        while frame is not None:
            if frame.f_code.co_name == "_queue":  # Device.send and send_many both
                return True
            frame = frame.f_back
    return False


async def texts(device: AsyncDevice, cid: str) -> list[str]:
    return [row.text or "" for row in await device.messages(cid)]


@contextlib.asynccontextmanager
async def joined_pair(
    broker: Broker, tmp_path: Path
) -> AsyncIterator[tuple[AsyncDevice, AsyncDevice, str]]:
    async with (
        async_device(broker, tmp_path, "alice") as alice,
        async_device(broker, tmp_path, "bob") as bob,
    ):
        await alice.wait_connected()
        await bob.wait_connected()
        joins = bob.events()
        cid = await alice.create_conversation([bob.pid])
        await next_of(joins, Joined, lambda e: e.cid == cid)
        # Then alice's presence (device/presence.py), before the tests count events.
        seen = await next_of(joins, PresenceChanged, lambda e: e.pid == alice.pid)
        assert isinstance(seen, PresenceChanged) and seen.online
        joins.close()
        yield alice, bob, cid


async def test_two_async_devices_exchange_messages_and_events(any_broker: Broker, tmp_path) -> None:
    async with (
        async_device(any_broker, tmp_path, "alice") as alice,
        async_device(any_broker, tmp_path, "bob") as bob,
    ):
        await alice.wait_connected()
        await bob.wait_connected()
        assert alice.connected and alice.protocol == "5"
        alice_events, bob_events, bob_too = alice.events(), bob.events(), bob.events()

        cid = await alice.create_conversation([bob.pid])
        joined = await next_of(bob_events, Joined)
        assert isinstance(joined, Joined)
        assert (joined.cid, set(joined.members)) == (cid, {alice.pid, bob.pid})

        sent = await alice.send(cid, "hello bob")
        assert sent.cid == cid
        got = await next_of(bob_events, MessageReceived)
        assert isinstance(got, MessageReceived)
        assert (got.sender, got.text, got.signed) == (alice.pid, "hello bob", True)
        # Every stream sees every event, in the same order.
        assert await next_of(bob_too, Joined) == joined
        assert await next_of(bob_too, MessageReceived) == got

        await bob.send(cid, "hi alice")
        answer = await next_of(alice_events, MessageReceived)
        assert isinstance(answer, MessageReceived) and answer.text == "hi alice"
        receipt = await next_of(alice_events, ReceiptReceived, lambda e: e.sender == bob.pid)
        assert isinstance(receipt, ReceiptReceived) and receipt.cid == cid

        assert await alice.wait_drained(10)
        assert await alice.outbox() == []
        (info,) = await bob.conversations()
        assert (info.cid, set(info.members), info.member) == (cid, {alice.pid, bob.pid}, True)
        assert await texts(bob, cid) == ["hello bob"]
        assert [row.text for row in await alice.sent(cid)] == ["hello bob"]
        assert await alice.fingerprint(bob.pid) == await bob.fingerprint()
        assert await alice.verify(bob.pid, await bob.fingerprint())
    # Leaving the block closed both: their streams end (after what they hold), their
    # calls are refused.
    async with asyncio.timeout(5):
        rest = [e async for e in alice_events]
    assert all(not isinstance(e, MessageReceived) or e.text == "hi alice" for e in rest)
    with pytest.raises(RuntimeError, match="closed"):
        await alice.send(cid, "too late")
    with pytest.raises(RuntimeError, match="closed"):
        alice.events()


async def test_members_are_invited_removed_and_leave(mosquitto: Mosquitto, tmp_path) -> None:
    async with (
        async_device(mosquitto, tmp_path, "alice") as alice,
        async_device(mosquitto, tmp_path, "bob") as bob,
        async_device(mosquitto, tmp_path, "carol") as carol,
    ):
        for device in (alice, bob, carol):
            await device.wait_connected()
        bob_events, carol_events = bob.events(), carol.events()
        cid = await alice.create_conversation([bob.pid])
        await next_of(bob_events, Joined, lambda e: e.cid == cid)

        await alice.invite(cid, [carol.pid])
        joined = await next_of(carol_events, Joined, lambda e: e.cid == cid)
        assert isinstance(joined, Joined) and carol.pid in joined.members
        await alice.send(cid, "welcome carol")
        got = await next_of(carol_events, MessageReceived)
        assert isinstance(got, MessageReceived) and got.text == "welcome carol"

        await alice.remove(cid, [carol.pid])
        removed = await next_of(carol_events, Removed, lambda e: e.cid == cid)
        assert isinstance(removed, Removed)

        await bob.leave(cid)  # alice, the admin, publishes the epoch without bob
        await until(lambda: alice.device.conversations()[0].members == (alice.pid,), "a leave")
        assert [info.members for info in await alice.conversations()] == [(alice.pid,)]


async def test_a_send_cancelled_while_running_finishes_and_one_not_started_does_nothing(
    mosquitto: Mosquitto, tmp_path
) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        # Hold the state file from another thread: the first send blocks inside
        # Device.send (running on the writer thread), the second waits behind it.
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with alice.device.state.transaction():
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(5)
        running = asyncio.create_task(alice.send(cid, "first"))
        await until(writer_is_in_send, "the send to block on the held state file")
        queued = asyncio.create_task(alice.send(cid, "second"))
        await asyncio.sleep(0)  # its first step: submitted behind the running one
        running.cancel()
        queued.cancel()
        await asyncio.sleep(0.2)
        assert queued.cancelled()  # never started: cancelled at once
        assert not running.done()  # started: it finishes before the cancel goes on
        release.set()
        holder.join(5)
        with pytest.raises(asyncio.CancelledError):
            await running
        assert running.cancelled()

        # What the running send accepted is delivered; the queued one never existed.
        assert [row.text for row in await alice.sent(cid)] == ["first"]
        await alice.send(cid, "third")
        await until(lambda: len(bob.device.messages(cid)) >= 2, "bob receives")
        assert await texts(bob, cid) == ["first", "third"]
        assert await alice.wait_drained(10)


async def test_many_cancelled_sends_deliver_exactly_what_was_accepted(
    mosquitto: Mosquitto, tmp_path
) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        sends = [asyncio.create_task(alice.send(cid, f"m{i}")) for i in range(60)]
        await asyncio.sleep(0.005)
        for task in sends:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        accepted = [row.text for row in await alice.sent(cid)]
        # The writer thread keeps going while the loop delivers the cancellations one
        # task at a time: any of them may have been accepted, in call order, once.
        made = [f"m{i}" for i in range(60)]
        assert accepted == [text for text in made if text in accepted]
        returned = [t.result().id for t in sends if not t.cancelled()]
        assert len(returned) <= len(accepted)
        # Every accepted one arrives; none that was cancelled before it started does.
        await alice.send(cid, "end")
        await until(lambda: len(bob.device.messages(cid)) == len(accepted) + 1, "delivery")
        assert await texts(bob, cid) == [*accepted, "end"]


async def test_close_while_iterating_ends_the_stream_after_what_was_emitted(
    mosquitto: Mosquitto, tmp_path
) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        seen: list[str] = []
        stream = bob.events()

        async def read() -> None:
            async for event in stream:
                if isinstance(event, MessageReceived):
                    seen.append(event.text)

        reader = asyncio.create_task(read())
        await alice.send_many(cid, ["one", "two", "three"])
        await until(lambda: len(seen) == 3, "bob's reader")
        await bob.close()
        async with asyncio.timeout(5):
            await reader  # ends, no exception
        assert seen == ["one", "two", "three"]
        assert not bob.connected
        await bob.close()  # idempotent


async def test_close_lets_calls_made_before_it_finish_and_releases_the_state(
    mosquitto: Mosquitto, tmp_path
) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        path, broker = alice.device.state.path, alice.device.broker
        sending = asyncio.create_task(alice.send(cid, "sent as alice closes"))
        await alice.close()
        assert (await sending).cid == cid
        # Nothing is half-closed: the same state file opens again, and its outbox
        # (or the broker, if it left in time) delivers the message.
        async with AsyncDevice(path, broker, link=FAST) as again:
            assert again.pid == alice.pid
            await until(lambda: bob.device.messages(cid), "bob receives")
            assert await texts(bob, cid) == ["sent as alice closes"]
            assert await again.wait_drained(10)


async def test_cancelling_close_still_closes(mosquitto: Mosquitto, tmp_path) -> None:
    device = await async_device(mosquitto, tmp_path, "alice").start()
    await device.wait_connected()
    pid = device.pid
    closing = asyncio.create_task(device.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not device.connected
    with pytest.raises(RuntimeError, match="closed"):
        await device.send("c", "x")
    # The lock on the state file is gone: another device opens and starts on it.
    with Device(tmp_path / "alice.sqlite3", BrokerOptions(port=free_port())) as again:
        assert again.pid == pid


async def test_a_slow_reader_gets_a_counted_marker_and_the_rest_is_in_the_store(
    mosquitto: Mosquitto, tmp_path
) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        slow, fast = bob.events(limit=5), bob.events()
        sent = [f"m{i}" for i in range(30)]
        await alice.send_many(cid, sent)
        for text in sent:  # the other stream, read at once, misses nothing
            got = await next_of(fast, MessageReceived)
            assert isinstance(got, MessageReceived) and got.text == text
        assert slow.dropped == 25

        first = [await anext(slow) for _ in range(6)]
        assert [e.text for e in first[:5] if isinstance(e, MessageReceived)] == sent[:5]
        marker = first[5]
        assert isinstance(marker, EventsDropped)
        assert (marker.count, marker.messages) == (25, 25)
        assert marker.first_id is not None and marker.last_id is not None
        rows = await bob.messages(cid, after_id=marker.first_id - 1)
        assert [r.text for r in rows if r.id <= marker.last_id] == sent[5:]

        # Caught up, the slow stream delivers again.
        await alice.send(cid, "after")
        got = await next_of(slow, MessageReceived)
        assert isinstance(got, MessageReceived) and got.text == "after"


async def test_errors_are_the_fieldchat_tree(mosquitto: Mosquitto, tmp_path) -> None:
    async with async_device(mosquitto, tmp_path, "alice") as alice:
        await alice.wait_connected()
        with pytest.raises(InvalidId):
            await alice.send("c" * 32, "not an id")
        with pytest.raises(UnknownConversation):
            await alice.send("a" * 26, "nobody")
        with pytest.raises(UnknownParticipant, match=r"no bundle for q+a within 0.3 s"):
            await alice.create_conversation(["q" * 25 + "a"], timeout=0.3)
        # The same state file cannot run twice; the first goes on.
        twin = AsyncDevice(tmp_path / "alice.sqlite3", alice.device.broker, link=FAST)
        with pytest.raises(ConfigError, match="in use"):
            await twin.start()
        assert alice.connected
    for error in (InvalidId, UnknownConversation, UnknownParticipant, ConfigError):
        assert issubclass(error, FieldchatError)

    wrong = AsyncDevice(
        tmp_path / "w.sqlite3",
        BrokerOptions(port=mosquitto.port, credential=SecretStr("wrong")),
        link=FAST,
    )
    async with wrong:
        with pytest.raises(NotAuthorized, match="refused the credential"):
            await wrong.wait_connected(10)
    nowhere = AsyncDevice(tmp_path / "n.sqlite3", BrokerOptions(port=free_port()), link=FAST)
    async with nowhere:
        with pytest.raises(ConnectFailed, match="not connected within 1 s: cannot reach broker"):
            await nowhere.wait_connected(1)


async def test_a_cancelled_wait_is_prompt_and_use_before_start_is_refused(tmp_path) -> None:
    device = AsyncDevice(tmp_path / "x.sqlite3", BrokerOptions(port=free_port()), link=FAST)
    with pytest.raises(RuntimeError, match="start the AsyncDevice first"):
        await device.send("c", "x")
    async with device:
        waiting = asyncio.create_task(device.wait_connected(30))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert time.monotonic() - started < 1.0  # one slice (0.1 s), not the 30 s asked
    with pytest.raises(RuntimeError, match="starts once"):
        await device.start()


def test_the_sync_api_does_not_load_the_asyncio_one() -> None:
    code = (
        "import sys\n"
        "import fieldchat.device\n"
        "bare = ['asyncio' in sys.modules, 'fieldchat.device.aio' in sys.modules]\n"
        "from fieldchat.device import Device\n"
        "print(bare, 'fieldchat.device.aio' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[False, False] False"


async def test_a_blocked_loop_does_not_stop_the_device(mosquitto: Mosquitto, tmp_path) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        stream = bob.events(limit=4)
        sent = [f"m{i}" for i in range(20)]
        await alice.send_many(cid, sent)
        # Block bob's event loop (as a careless callback would) until his device has
        # stored everything: its worker receives, stores and acknowledges regardless.
        end = time.monotonic() + 15
        while len(bob.device.messages(cid)) < len(sent):
            assert time.monotonic() < end, "bob's device stalled with its loop blocked"
            time.sleep(0.02)  # blocking the loop is the point
        got = [await anext(stream) for _ in range(5)]
        assert [e.text for e in got[:4] if isinstance(e, MessageReceived)] == sent[:4]
        marker = got[4]
        assert isinstance(marker, EventsDropped)
        assert (marker.count, marker.messages) == (16, 16)
        assert stream.dropped == 16


async def test_sends_are_accepted_offline_and_the_link_is_reported(
    mosquitto: Mosquitto, tmp_path
) -> None:
    async with joined_pair(mosquitto, tmp_path) as (alice, bob, cid):
        events = alice.events()
        mosquitto.stop()
        await next_of(events, Disconnected)
        assert not alice.connected
        await alice.send(cid, "written while the broker was away")
        assert await alice.outbox()  # kept until the broker acknowledges it
        assert await alice.undelivered(cid) == 1
        mosquitto.start()
        await next_of(events, Connected)
        await alice.wait_connected(15)
        assert await alice.wait_drained(15)
        await until(lambda: bob.device.messages(cid), "bob receives")
        assert await texts(bob, cid) == ["written while the broker was away"]
