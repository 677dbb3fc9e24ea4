"""``fieldchat device …``: the participant CLI. It parses options, builds settings and
calls :class:`device.client.Device`; every :class:`~schemas.FieldchatError` becomes
one line on stderr and an exit code from the one table, :mod:`fieldchat.schemas.exits`
(docs/device.md, "Exit codes"). SIGINT and SIGTERM are the same stop
(:mod:`fieldchat.schemas.signals`): the device closes (parks its reserved steps, saves
its state, disconnects); ``listen`` and ``chat`` then say they stopped and exit 0, a
one-shot command says it was interrupted and exits 130.

Cold start: importing this module loads typer and the standard library only (no
pydantic, cryptography, paho or asyncio), so ``--help`` costs about as much as
importing paho. A command imports the device stack when it opens a state file
(:func:`_load_stack`), with a stop signal held meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fieldchat._command import command_name
from fieldchat.device import remote
from fieldchat.schemas.errors import (
    ConfigError,
    FieldchatError,
    LimitExceeded,
    ProtocolError,
    Refused,
    TransportError,
)
from fieldchat.schemas.exits import ExitCode, epilog
from fieldchat.schemas.signals import Interrupts

if TYPE_CHECKING:
    from fieldchat.device.client import Device, SentMessage
    from fieldchat.device.config import DeviceSettings
    from fieldchat.device.control_client import ControlClient
    from fieldchat.device.events import Event, PublishRefused
    from fieldchat.device.state import DeviceState

__all__ = ["device_app"]

device_app = typer.Typer(
    name="device",
    help="A fieldchat participant: identity, conversations, sending and listening.",
    no_args_is_help=True,
)
conv_app = typer.Typer(help="Create, change and list conversations.", no_args_is_help=True)
device_app.add_typer(conv_app, name="conv")

JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines).")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the broker.")]
OK, REFUSED, USAGE, UNAVAILABLE, NOT_YET, INTERRUPTED = tuple(ExitCode)
# What each kind of command can return (its --help ends with them).
LOCAL = epilog(OK, REFUSED, USAGE, INTERRUPTED)  # no network
ONLINE = epilog(OK, REFUSED, USAGE, UNAVAILABLE, INTERRUPTED)
SERVICE = epilog(OK, REFUSED, USAGE, UNAVAILABLE)  # a stop signal is a clean stop: 0
_CURSOR = "listen_cursor"
# listen saves its cursor past a batch of rows before printing them (docs/device.md):
# a SIGKILL or power cut between the two leaves at most this many rows unshown (they
# stay in the state file); never one shown twice.
LISTEN_BATCH = 64
# SIGINT and SIGTERM raise KeyboardInterrupt while a command runs (process state, as
# logging is); a second one while stopping forces the exit.
_interrupts = Interrupts()


@dataclass
class _Options:
    config: Path | None = None
    flags: dict[str, object] | None = None
    settings: DeviceSettings | None = None

    def load(self) -> DeviceSettings:
        _load_stack()
        from fieldchat.device.config import DeviceSettings  # noqa: PLC0415 - loaded above

        if self.settings is None:
            self.settings = DeviceSettings.load(self.config, **(self.flags or {}))
        return self.settings


_options = _Options()


@device_app.callback()
def _device(
    state: Annotated[
        Path | None,
        typer.Option(envvar="FIELDCHAT_STATE", help="State file (identity, keys, outbox)."),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            envvar="FIELDCHAT_BROKER",
            help="mqtt://host:port or mqtts://host:port; several, comma-separated, for the "
            "nodes of a cluster (tried in turn when one cannot be reached).",
        ),
    ] = None,
    credential: Annotated[
        str | None,
        typer.Option(
            envvar="FIELDCHAT_CREDENTIAL",
            help="From `fieldchat broker enroll PID`.",
            show_default=False,
        ),
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(
            envvar="FIELDCHAT_GATEWAY",
            help="http(s)://host:port of the gateway, for history (what was sent while away).",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_CONFIG", help="TOML file with these settings.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(envvar="FIELDCHAT_PREFIX", help="Topic prefix (default fc/v1).")
    ] = None,
    protocol: Annotated[
        str | None, typer.Option(envvar="FIELDCHAT_PROTOCOL", help="auto, 5 or 3.1.1.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_CA_FILE", help="CA certificate for TLS.")
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_CERT_FILE", help="Client certificate for TLS.")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_KEY_FILE", help="Client key for TLS.")
    ] = None,
    low_bandwidth: Annotated[
        bool | None,
        typer.Option(
            "--low-bandwidth/--normal-bandwidth",
            envvar="FIELDCHAT_LOW_BANDWIDTH",
            help="Tune the link for slow links (rare pings, batched receipts).",
        ),
    ] = None,
    power_safe: Annotated[
        bool | None,
        typer.Option(
            "--power-safe/--crash-safe",
            envvar="FIELDCHAT_POWER_SAFE",
            help="send returns once a power cut cannot lose the message (an fsync each).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log the link.")] = False,
) -> None:
    """A fieldchat participant. Settings: flags, FIELDCHAT_* variables, a TOML file."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(message)s",
    )
    _options.config = config
    _options.settings = None
    _options.flags = {
        "state": state,
        "broker": broker,
        "credential": credential,
        "gateway": gateway,
        "prefix": prefix,
        "protocol": protocol,
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
        "low_bandwidth": low_bandwidth,
        "power_safe": power_safe,
    }


_loaded = False


def _load_stack() -> None:
    """Import the device stack (pydantic, cryptography, paho) and turn tracing on
    (docs/tracing.md; queued spans leave at exit, bounded, 3 s). A stop signal during
    the imports is held until they are done (one raised inside an import can come out
    as another error), then raised: the command says it was interrupted.

    Raises:
        ConfigError: tracing asked for in the environment but impossible.
    """
    global _loaded  # noqa: PLW0603 - once per process, like the imports themselves
    if _loaded:
        return
    with _interrupts.deferred():
        import fieldchat.device.cli_output  # noqa: PLC0415
        import fieldchat.device.client  # noqa: PLC0415
        import fieldchat.device.config  # noqa: PLC0415
        import fieldchat.device.history  # noqa: PLC0415, F401
        from fieldchat.schemas import tracing  # noqa: PLC0415

        _loaded = True
        tracing.configure(tracing.TraceSettings.from_environ(os.environ))


@contextlib.contextmanager
def _failures() -> Iterator[None]:
    """One line per failure a user can cause, and an exit code by kind."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(USAGE) from None
    except TransportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(UNAVAILABLE) from None
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(REFUSED) from None


@contextlib.contextmanager
def _errors(service: str | None = None) -> Iterator[None]:
    """A command's body: :func:`_failures`, and SIGINT or SIGTERM raise
    KeyboardInterrupt inside (the ``finally`` blocks close the device). A ``service``
    (listen, chat) stopped that way ends normally: one line, status 0; a one-shot
    command says it was interrupted (status 130: what it did may be partial).
    """
    try:
        with _interrupts.installed(), _failures():
            yield
    except KeyboardInterrupt:
        if service is not None:
            typer.echo(f"fieldchat device {service} stopped.", err=True)
            raise typer.Exit(0) from None
        typer.echo("fieldchat device: interrupted before it finished.", err=True)
        raise typer.Exit(INTERRUPTED) from None


def _close(device: Device) -> None:
    """Close the device (park its reserved steps, save, disconnect) in one piece: a
    first stop signal during it is held until it is done."""
    with _interrupts.deferred():
        device.close()


def _open_existing(path: Path) -> DeviceState:
    """The state file at ``path``, which must hold an identity: only ``init`` creates
    one (``whoami`` used to make a new identity in the default data directory).

    Raises:
        ConfigError: no state file there, or one without an identity.
    """
    from fieldchat.device.state import DeviceState  # noqa: PLC0415 - the stack is loaded

    hint = f"create one with `{command_name()} device --state {path} init`"
    if not path.expanduser().is_file():
        raise ConfigError(f"no state file {path} (no identity yet): {hint}")
    state = DeviceState(path)
    if state.load("identity") is None:
        state.close()
        raise ConfigError(f"state file {path} holds no identity yet: {hint}")
    return state


def _daemon() -> ControlClient | None:
    """The daemon serving this state file (``fieldchat device run``), or ``None``: the
    command then runs standalone (docs/device.md, Daemon and control socket)."""
    state = (_options.flags or {}).get("state")
    return remote.daemon_for(state if isinstance(state, Path) else None, _options.config)


def _device_for(on_event: object = None) -> Device:
    from fieldchat.device.client import Device  # noqa: PLC0415 - loaded by _options.load
    from fieldchat.device.history import GatewayHistory  # noqa: PLC0415

    settings = _options.load()
    state = _open_existing(settings.state)
    try:
        broker = settings.broker_options(state.get_meta("broker"), state.get_meta("credential"))
        device = Device(
            state,
            broker,
            link=settings.link_options(),
            prefix=settings.prefix,
            on_event=on_event,  # type: ignore[arg-type]
            power_safe=settings.power_safe,
        )
    except BaseException:
        state.close()
        raise
    gateway = settings.gateway or state.get_meta("gateway")
    if gateway:
        try:
            device.history = GatewayHistory(gateway, device.engine.identity)
        except BaseException:
            _close(device)
            raise
    return device


def _saved_credential(path: Path) -> bool:
    from fieldchat.device.state import DeviceState  # noqa: PLC0415 - the stack is loaded

    state = DeviceState(path)
    try:
        return state.get_meta("credential") is not None
    finally:
        state.close()


@contextlib.contextmanager
def _connected(
    timeout: float, on_event: object = None, *, unchanged: str = "nothing was changed"
) -> Iterator[Device]:
    """The device, connected; a failure to connect says what it left as it was."""
    device = _device_for(on_event)
    try:
        device.start()
        try:
            device.wait_connected(timeout)
        except TransportError as exc:
            raise type(exc)(f"{exc}; {unchanged}") from None
        yield device
    finally:
        _close(device)


def _finish(device: Device, timeout: float) -> None:
    """Wait until the broker has everything we queued; what is left is kept in the
    outbox, which is not a failure (exit 0): it leaves with the next command that
    connects, and running this one again would do the change twice."""
    if not device.wait_drained(timeout):
        waiting = len(device.outbox())
        typer.echo(
            f"fieldchat device: {waiting} publication(s) kept in the outbox after "
            f"{timeout:g} s, will be sent when the broker takes them (by the next "
            "device command that connects)",
            err=True,
        )


# -- identity ----------------------------------------------------------------------------


@device_app.command(epilog=ONLINE)
def init(
    post_quantum: Annotated[
        bool, typer.Option("--pq/--no-pq", help="Give the identity an ML-KEM-768 key.")
    ] = True,
    json_out: JsonOut = False,
) -> None:
    """Create this device's identity (once) and save the broker URL and credential."""
    with _errors():
        settings = _options.load()
        from fieldchat.device.client import Device  # noqa: PLC0415 - loaded by _options.load
        from fieldchat.device.history import gateway_base  # noqa: PLC0415
        from fieldchat.device.state import DeviceState  # noqa: PLC0415

        state = DeviceState(settings.state)
        try:
            saved: dict[str, str | None] = {}
            if settings.broker:
                settings.broker_options(None, None)  # validate the URL
                saved["broker"] = settings.broker
                saved["protocol"] = None  # a level remembered for the old broker goes
            if settings.credential:
                saved["credential"] = settings.credential.get_secret_value()
            if settings.gateway:
                saved["gateway"] = gateway_base(settings.gateway)
            if saved:
                state.set_meta(saved)
            existed = state.load("identity") is not None
            device = Device(state, prefix=settings.prefix, post_quantum=post_quantum)
            pid, fingerprint = device.pid, device.fingerprint()
            _close(device)
        except BaseException:
            state.close()
            raise
        registered = False
        if settings.credential or (settings.broker and _saved_credential(settings.state)):
            # Connect once: publish our bundle (retained) and open the persistent session
            # on our inbox, so others can invite us while we are away.
            saved_only = (
                "the identity and settings are saved; the bundle is published by the "
                "next command that connects"
            )
            with _connected(10.0, unchanged=saved_only) as online:
                _finish(online, 10.0)
            registered = True
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "pid": pid,
                    "fingerprint": fingerprint,
                    "new": not existed,
                    "state": str(settings.state),
                    "registered": registered,
                }
            )
        )
        return
    typer.echo(f"pid          {pid}")
    typer.echo(f"fingerprint  {fingerprint}")
    typer.echo(f"state        {settings.state}")
    if registered:
        typer.echo("registered   bundle published; invitations wait for this device")
    if not existed and not settings.credential:
        fc = command_name()
        typer.echo(
            f"next: on the broker run `{fc} broker enroll {pid}`, then "
            f"`{fc} device --credential … init` to save the credential"
        )


@device_app.command(epilog=LOCAL)
def whoami(
    json_out: JsonOut = False,
    pid_only: Annotated[
        bool, typer.Option("--pid", help="Print only the pid (for scripts and enrollment).")
    ] = False,
) -> None:
    """Print this device's pid and fingerprint."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.whoami(daemon, json_out=json_out, pid_only=pid_only)
            return
        device = _device_for()
        pid, fingerprint = device.pid, device.fingerprint()
        _close(device)
    if pid_only:
        typer.echo(pid)
    elif json_out:
        typer.echo(json.dumps({"pid": pid, "fingerprint": fingerprint}))
    else:
        typer.echo(f"pid          {pid}\nfingerprint  {fingerprint}")


@device_app.command(epilog=ONLINE)
def verify(
    pid: str,
    fingerprint: Annotated[
        str | None,
        typer.Argument(help="The fingerprint read out by its owner; omit to just show it."),
    ] = None,
    timeout: Timeout = 10.0,
) -> None:
    """Show PID's fingerprint, or compare it with one read out of band."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.verify(daemon, pid, fingerprint, timeout)
            return
        device = _device_for()
        try:
            if device.engine.bundle_of(pid) is None:
                device.start()
                device.wait_connected(timeout)
                device.fetch_bundles([pid], timeout)
            known = device.fingerprint(pid)
            ok = device.verify(pid, fingerprint) if fingerprint else None
        finally:
            _close(device)
    typer.echo(f"{pid}  {known}")
    if ok is False:
        typer.echo("error: FINGERPRINTS DIFFER: do not trust this participant", err=True)
        raise typer.Exit(1)
    if ok:
        typer.echo("verified")


# -- conversations -----------------------------------------------------------------------


@conv_app.command("create", epilog=ONLINE)
def conv_create(
    members: Annotated[list[str] | None, typer.Argument(help="Pids to invite.")] = None,
    compress: Annotated[bool, typer.Option(help="Compress plaintexts.")] = False,
    sign_every: Annotated[int, typer.Option(help="Sign every Nth envelope (1: all, 0: none).")] = 1,
    low_bandwidth: Annotated[
        bool, typer.Option("--low-bandwidth", help="Compressed, one signature in 32.")
    ] = False,
    require_pq: Annotated[
        bool,
        typer.Option(
            "--require-pq/--allow-x25519-only",
            help="Admit only members with an ML-KEM-768 key (every grant hybrid).",
        ),
    ] = True,
    timeout: Timeout = 10.0,
    json_out: JsonOut = False,
) -> None:
    """Create a conversation (you are its admin) and print its id."""
    with _errors():
        if (daemon := _daemon()) is not None:
            params = {"members": members or [], "compress": compress, "sign_every": sign_every}
            params |= {"low_bandwidth": low_bandwidth, "require_pq": require_pq}
            params |= {"timeout": timeout}
            remote.conv_create(daemon, params, json_out=json_out)
            return
    with _errors(), _connected(timeout) as device:
        from fieldchat.device.config import low_bandwidth_policy  # noqa: PLC0415 - loaded
        from fieldchat.schemas import Policy  # noqa: PLC0415

        policy = (
            low_bandwidth_policy()
            if low_bandwidth
            else Policy(compress=compress, sign_every=sign_every)
        ).model_copy(update={"require_pq": require_pq})
        cid = device.create_conversation(members or [], policy=policy, timeout=timeout)
        _finish(device, timeout)
    typer.echo(json.dumps({"cid": cid}) if json_out else cid)


@conv_app.command("invite", epilog=ONLINE)
def conv_invite(cid: str, pids: list[str], timeout: Timeout = 10.0) -> None:
    """Add members to a conversation (admins only)."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.conv_change(daemon, "invite", {"cid": cid, "pids": pids, "timeout": timeout})
            return
    with _errors(), _connected(timeout) as device:
        device.invite(cid, pids, timeout=timeout)
        _finish(device, timeout)


@conv_app.command("remove", epilog=ONLINE)
def conv_remove(cid: str, pids: list[str], timeout: Timeout = 10.0) -> None:
    """Remove members; everyone left re-keys (admins only)."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.conv_change(daemon, "remove", {"cid": cid, "pids": pids})
            return
    with _errors(), _connected(timeout) as device:
        device.remove(cid, pids)
        _finish(device, timeout)


@conv_app.command("leave", epilog=ONLINE)
def conv_leave(cid: str, timeout: Timeout = 10.0) -> None:
    """Leave a conversation."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.conv_change(daemon, "leave", {"cid": cid})
            return
    with _errors(), _connected(timeout) as device:
        device.leave(cid)
        _finish(device, timeout)


@conv_app.command("list", epilog=LOCAL)
def conv_list(json_out: JsonOut = False) -> None:
    """List known conversations (no network)."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.conv_list(daemon, json_out=json_out)
            return
        device = _device_for()
        infos = device.conversations()
        me = device.pid
        _close(device)
    for info in infos:
        if json_out:
            typer.echo(
                json.dumps(
                    {
                        "cid": info.cid,
                        "epoch": info.epoch,
                        "members": list(info.members),
                        "admins": list(info.admins),
                        "member": info.member,
                    }
                )
            )
        else:
            state = "member" if info.member else "invited" if info.epoch < 0 else "left"
            admin = " admin" if me in info.admins else ""
            typer.echo(
                f"{info.cid}  epoch {info.epoch}  {len(info.members)} members  {state}{admin}"
            )


# -- messages ----------------------------------------------------------------------------


def _stdin_batches(limit: int = 100) -> Iterator[list[str]]:
    """Lines of stdin in batches: whatever arrived within 50 ms, at most ``limit``."""
    batch: list[str] = []
    while True:
        ready = not batch or select.select([sys.stdin], [], [], 0.05)[0]
        if ready:
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text:
                batch.append(text)
            if len(batch) < limit:
                continue
        if batch:
            yield batch
            batch = []
    if batch:
        yield batch


SendTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds to try to deliver (with --wait: to wait) before leaving it in the outbox."
    ),
]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Exit 0 only once the broker has the message (its PUBACK); 75 if it is "
        "still in the outbox after --timeout.",
    ),
]
Acks = Annotated[
    int,
    typer.Option(
        "--acks",
        min=0,
        metavar="N",
        help="Wait (implies --wait) until N members acknowledged it (delivery receipts).",
    ),
]


@device_app.command(epilog=epilog(OK, REFUSED, USAGE, UNAVAILABLE, NOT_YET, INTERRUPTED))
def send(
    cid: str,
    text: Annotated[
        str | None, typer.Argument(help="The text; omit or '-' to read lines from stdin.")
    ] = None,
    timeout: SendTimeout = 10.0,
    wait: Wait = False,
    acks: Acks = 0,
) -> None:
    """Send a message (durable at once; delivered when the broker is reachable)."""
    refused: list[PublishRefused] = []
    with _errors():
        if (daemon := _daemon()) is not None:
            if not (wait or acks):
                remote.send(daemon, cid, text)
                return
            from fieldchat.device.remote_wait import send_and_wait  # noqa: PLC0415

            batches = [[text]] if text is not None and text != "-" else _stdin_batches()
            send_and_wait(daemon, cid, batches, timeout=timeout, acks=acks)
            return
        _options.load()
        from fieldchat.device.cli_output import refusal_line  # noqa: PLC0415 - loaded
        from fieldchat.device.cli_wait import Delivery, deliver  # noqa: PLC0415
        from fieldchat.device.events import PublishRefused  # noqa: PLC0415

        device = _device_for(lambda e: refused.append(e) if isinstance(e, PublishRefused) else None)
        try:
            if acks:
                _check_acks(device, cid, acks)
            sent = _queue(device, cid, text)
            wanted = Delivery(sent, broker=wait or acks > 0, acks=acks)
            kept = deliver(device, wanted, timeout, refused)
        finally:
            _close(device)
        if refused:  # checked after close: the worker has emitted all it committed
            raise Refused(refusal_line(refused))
    if kept is not None:
        typer.echo(kept.line(waited=wanted.broker), err=True)
        if wanted.broker:
            raise typer.Exit(NOT_YET)


def _check_acks(device: Device, cid: str, acks: int) -> None:
    """``--acks N`` asks for no more members than the conversation has besides us.

    Raises:
        ConfigError: it does (nothing was sent).
    """
    infos = {info.cid: info for info in device.conversations()}
    others = len(infos[cid].members) - 1 if cid in infos else acks
    if acks > others:
        raise ConfigError(
            f"--acks {acks}: conversation {cid} has {others} other member(s); nothing was sent"
        )


def _queue(device: Device, cid: str, text: str | None) -> list[SentMessage]:
    """Accept ``text`` (or stdin's lines) into the outbox and start the device.

    Raises:
        ProtocolError, LimitExceeded: refused; the message says what was sent before.
    """
    sent: list[SentMessage] = []
    try:
        if text is not None and text != "-":
            sent += device.send_many(cid, [text])
            device.start()
        else:
            device.start()
            for batch in _stdin_batches():
                sent += device.send_many(cid, batch)
    except (ProtocolError, LimitExceeded) as exc:
        before = f"the {len(sent)} line(s) before were accepted" if sent else "nothing was sent"
        raise type(exc)(f"{exc}; {before}") from None
    return sent


ListenTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds without the broker before saying so once (with --exit-on-disconnect: "
        "before giving up)."
    ),
]
ExitOnDisconnect = Annotated[
    bool,
    typer.Option(
        "--exit-on-disconnect",
        help="Exit 3 when the broker is not reached within --timeout or the connection "
        "drops, instead of waiting for it with backoff.",
    ),
]


@device_app.command(epilog=SERVICE)
def listen(
    cid: Annotated[str | None, typer.Argument(help="Only this conversation.")] = None,
    json_out: JsonOut = False,
    count: Annotated[int | None, typer.Option(help="Exit after this many messages.")] = None,
    duration: Annotated[float | None, typer.Option(help="Exit after this many seconds.")] = None,
    timeout: ListenTimeout = 10.0,
    exit_on_disconnect: ExitOnDisconnect = False,
) -> None:
    """Print messages as they arrive, each at most once across runs, until stopped.

    Without the broker it keeps waiting (reconnecting with backoff) and shows what is
    stored meanwhile; it says so once.
    """
    events: queue.Queue[Event] = queue.Queue()
    shown = 0
    with _errors("listen"):
        if (daemon := _daemon()) is not None:
            remote.listen(
                daemon,
                cid,
                json_out=json_out,
                count=count,
                duration=duration,
                exit_on_disconnect=timeout if exit_on_disconnect else None,
            )
            return
        device = _device_for(events.put)
        from fieldchat.device.cli_output import note, render, write  # noqa: PLC0415 - loaded
        from fieldchat.device.events import Disconnected  # noqa: PLC0415

        try:
            if cid is not None and cid not in device.engine.conversations():
                raise ConfigError(f"unknown conversation {cid}")
            cursor = int(device.state.get_meta(_CURSOR) or 0)
            device.start()
            if exit_on_disconnect:
                device.wait_connected(timeout)
            waiting = _BrokerWait(device, timeout)
            end = time.monotonic() + duration if duration is not None else None
            while count is None or shown < count:
                waiting.check()
                # Stored rows past the cursor first: messages that arrived while another
                # command (send, conv …) was running are shown here, once.
                limit = LISTEN_BATCH if count is None else min(LISTEN_BATCH, count - shown)
                rows = device.state.received(cid, after_id=cursor, limit=limit)
                if rows:
                    cursor = rows[-1].id
                    # The cursor passes the rows before they are printed, so no kill
                    # shows one twice (it printed them, then saved: issue 14); a
                    # SIGKILL in between leaves this batch unshown, still stored. A
                    # stop signal waits until the batch is out.
                    # The output is rendered first: between the save and the write
                    # there is then one write call (a kill there is the only way a
                    # row goes unshown; the soak hit it once in 9,600 messages when
                    # rendering a batch came in between).
                    text = render(rows, json_out)
                    with _interrupts.deferred():
                        device.state.set_meta({_CURSOR: str(cursor)})
                        write(text)
                    shown += len(rows)
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                if rows:
                    continue  # more may be stored already
                try:
                    event = events.get(timeout=0.5 if left is None else min(left, 0.5))
                except queue.Empty:
                    continue
                if exit_on_disconnect and isinstance(event, Disconnected):
                    raise TransportError(f"the connection to the broker dropped ({event.reason})")
                note(event, json_out)
        finally:
            _close(device)


class _BrokerWait:
    """``listen``'s one line while it waits for the broker (the link reconnects with
    backoff by itself), and one when the broker is there after all."""

    def __init__(self, device: Device, after: float) -> None:
        self.device = device
        self.deadline = time.monotonic() + after
        self.said = False

    def check(self) -> None:
        connected = self.device.connected
        if self.said and connected:
            typer.echo("fieldchat device listen: connected to the broker.", err=True)
            self.said = False
        elif not self.said and not connected:
            error = self.device.last_error
            if error is not None or time.monotonic() >= self.deadline:
                why = f" ({error})" if error is not None else ""
                typer.echo(
                    f"fieldchat device listen: waiting for the broker{why}; retrying with "
                    "backoff until it answers (stored messages are shown meanwhile).",
                    err=True,
                )
                self.said = True
                self.deadline = float("inf")  # then once per outage (the link says why)


@device_app.command(epilog=SERVICE)
def chat(cid: str, timeout: Timeout = 10.0) -> None:
    """Interactive chat: type lines to send them; incoming ones are printed.

    Ctrl-D ends it and keeps its place (what it showed is not shown again); Ctrl-C or
    SIGTERM stops it at once, keeping the outbox for the next command.
    """
    with _errors("chat"):
        if (daemon := _daemon()) is not None:
            remote.chat(daemon, cid)
            return
        device = _device_for()
        from fieldchat.device.cli_output import note, print_rows  # noqa: PLC0415 - loaded
        from fieldchat.device.events import MessageReceived  # noqa: PLC0415

        try:
            if cid not in device.engine.conversations():
                raise ConfigError(f"unknown conversation {cid}")
            cursor = int(device.state.get_meta(_CURSOR) or 0)

            def on_event(event: Event) -> None:
                nonlocal cursor
                if isinstance(event, MessageReceived) and event.cid == cid and event.id > cursor:
                    print_rows([event], json_out=False)
                    cursor = event.id
                else:
                    note(event, json_out=False)

            rows = device.messages(cid, after_id=cursor)
            print_rows(rows, json_out=False)
            cursor = rows[-1].id if rows else cursor
            device.on_event = on_event
            device.start()
            device.wait_connected(timeout)
            typer.echo(f"-- chatting in {cid} as {device.pid[:8]}; Ctrl-D to quit", err=True)
            for line in sys.stdin:
                if line.strip():
                    device.send(cid, line.rstrip("\n"))
                device.mark_read(cid)
            device.mark_read(cid)
            device.state.set_meta({_CURSOR: str(cursor)})
            _finish(device, timeout)
        finally:
            _close(device)


@device_app.command(epilog=LOCAL)
def outbox(json_out: JsonOut = False) -> None:
    """What is waiting for the broker (no network)."""
    with _errors():
        if (daemon := _daemon()) is not None:
            remote.outbox(daemon, json_out=json_out)
            return
        device = _device_for()
        rows = device.outbox()
        _close(device)
    for row in rows:
        if json_out:
            typer.echo(
                json.dumps(
                    {
                        "seq": row.seq,
                        "what": row.what,
                        "cid": row.cid,
                        "topic": row.topic,
                        "bytes": len(row.payload),
                        "queued_at": row.created_at,
                    }
                )
            )
        else:
            age = time.time() - row.created_at
            typer.echo(
                f"{row.seq:6d}  {row.what:7s}  {row.cid or '-':26s}  "
                f"{len(row.payload):5d} B  {age:6.0f} s ago"
            )
    if not json_out:
        typer.echo(f"{len(rows)} waiting", err=True)


# -- the daemon --------------------------------------------------------------------------


@device_app.command()
def run(
    tcp: Annotated[
        str | None,
        typer.Option(
            help="Also serve the control socket on loopback TCP HOST:PORT (127.0.0.1:PORT; "
            "clients present the token the daemon writes to STATE.token).",
        ),
    ] = None,
) -> None:
    """Run the device as a service: it owns the state file, stays connected, and serves
    a JSON-RPC control socket (STATE.sock) that the other device commands then use.
    SIGTERM or Ctrl-C stops it cleanly."""
    from fieldchat.device import daemon  # noqa: PLC0415 - only this command serves

    with _failures():
        daemon.run(_device_for, tcp=tcp)
