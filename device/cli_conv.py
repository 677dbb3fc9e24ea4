"""``fieldchat device conv …``: create, change and list conversations."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fieldchat.device import remote
from fieldchat.device.cli_common import (
    JsonOut,
    Timeout,
    connected,
    errors,
    finish,
    opened,
    running_daemon,
)

__all__ = ["conv_create", "conv_invite", "conv_leave", "conv_list", "conv_remove"]


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
    with errors():
        if (daemon := running_daemon()) is not None:
            params = {"members": members or [], "compress": compress, "sign_every": sign_every}
            params |= {"low_bandwidth": low_bandwidth, "require_pq": require_pq}
            params |= {"timeout": timeout}
            remote.conv_create(daemon, params, json_out=json_out)
            return
    with errors(), connected(timeout) as device:
        from fieldchat.device.config import low_bandwidth_policy  # noqa: PLC0415 - loaded
        from fieldchat.schemas import Policy  # noqa: PLC0415

        policy = (
            low_bandwidth_policy()
            if low_bandwidth
            else Policy(compress=compress, sign_every=sign_every)
        ).model_copy(update={"require_pq": require_pq})
        cid = device.create_conversation(members or [], policy=policy, timeout=timeout)
        finish(device, timeout)
    typer.echo(json.dumps({"cid": cid}) if json_out else cid)


def conv_invite(cid: str, pids: list[str], timeout: Timeout = 10.0) -> None:
    """Add members to a conversation (admins only)."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.conv_change(daemon, "invite", {"cid": cid, "pids": pids, "timeout": timeout})
            return
    with errors(), connected(timeout) as device:
        device.invite(cid, pids, timeout=timeout)
        finish(device, timeout)


def conv_remove(cid: str, pids: list[str], timeout: Timeout = 10.0) -> None:
    """Remove members; everyone left re-keys (admins only)."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.conv_change(daemon, "remove", {"cid": cid, "pids": pids})
            return
    with errors(), connected(timeout) as device:
        device.remove(cid, pids)
        finish(device, timeout)


def conv_leave(cid: str, timeout: Timeout = 10.0) -> None:
    """Leave a conversation."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.conv_change(daemon, "leave", {"cid": cid})
            return
    with errors(), connected(timeout) as device:
        device.leave(cid)
        finish(device, timeout)


def conv_list(json_out: JsonOut = False) -> None:
    """List known conversations (no network)."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.conv_list(daemon, json_out=json_out)
            return
        with opened() as device:
            infos = device.conversations()
            me = device.pid
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
