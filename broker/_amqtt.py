"""The broker's one seam with aMQTT (0.12.1, pinned), and with the internals its pin brings.

No other module of ``broker/`` imports ``amqtt`` (a test checks it).

**What we take from aMQTT, and why.** The TLS context of a listener: aMQTT's listener
model, :class:`amqtt.contexts.ListenerConfig` (certificate and key come as a pair, and
the files exist), turned into a server :class:`ssl.SSLContext` by
``amqtt.broker.Broker._create_ssl_context`` (a server context, client certificates
optional, a CA file, path or data for them when given). That is where aMQTT still
serves the design's "aMQTT with TLS and WebSocket listeners": the TLS context of the
TLS and WSS listeners is aMQTT's, so it behaves as aMQTT's own broker does.

**What is ours.** Everything else. The listeners are asyncio's TCP and TLS server and
the ``websockets`` server, started by :mod:`fieldchat.broker._listeners` (until issue 15 we
subclassed aMQTT's ``Broker`` to reach them, through its state machine
``transitions``, ``_start_listeners`` and ``_servers``, while our overrides already
created every server: that subclass is gone). The MQTT codec (``schemas/mqtt/``),
connections, sessions, routing, persistence, ACL and quotas are ours too
(docs/broker.md, "What is ours").

**The internals we rely on** are listed in :data:`REQUIRED`; :func:`check` raises
:class:`AmqttChanged` naming each one that is gone, and
``tests/broker/test_broker_amqtt_seam.py`` runs it, so an upgrade of aMQTT (or of the
``websockets`` it pins, ``websockets==15.0.1``, which the gateway's ``/ws`` also runs
on) fails there loudly instead of in a listener at run time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import ssl
from pathlib import Path
from typing import Any

from amqtt.broker import Broker as _AmqttBroker
from amqtt.contexts import ListenerConfig as _ListenerConfig
from amqtt.errors import BrokerError as _AmqttBrokerError
from websockets.asyncio.server import ServerConnection

from fieldchat.broker._errors import BrokerError
from fieldchat.schemas.errors import ConfigError

__all__ = [
    "AMQTT_VERSION",
    "REQUIRED",
    "AmqttChanged",
    "Internal",
    "abort_websocket",
    "check",
    "tls_context",
]

log = logging.getLogger(__name__)

AMQTT_VERSION = "0.12.1"  # pyproject.toml pins it; the version this seam was written for


class AmqttChanged(BrokerError):
    """aMQTT (or the ``websockets`` it pins) no longer has what :mod:`fieldchat.broker._amqtt` uses.

    The message names the attribute; install ``amqtt==0.12.1`` (pyproject.toml) or
    adapt :mod:`fieldchat.broker._amqtt`.
    """

    reason = "amqtt_changed"


@dataclasses.dataclass(frozen=True)
class Internal:
    """One attribute of another library that the broker relies on."""

    owner: str
    name: str
    why: str

    def changed(self, detail: str) -> AmqttChanged:
        return AmqttChanged(
            f"aMQTT changed: {self.owner}.{self.name} ({self.why}) {detail}; fieldchat's "
            f"broker was written for amqtt=={AMQTT_VERSION} (and the websockets it pins): "
            "install it, or adapt broker/_amqtt.py"
        )


_LISTENER = "amqtt.contexts.ListenerConfig"
_LISTENER_FIELDS = (
    Internal(_LISTENER, "ssl", "a listener with TLS"),
    Internal(_LISTENER, "certfile", "the listener's certificate, PEM"),
    Internal(_LISTENER, "keyfile", "the listener's private key, PEM"),
)
_CREATE_SSL_CONTEXT = Internal(
    "amqtt.broker.Broker", "_create_ssl_context", "the TLS server context of a listener"
)
# An instance attribute, set when a socket connects: the seam's test checks it on one.
WS_TRANSPORT = Internal(
    "websockets.asyncio.server.ServerConnection", "transport", "closing a socket at once"
)
REQUIRED = (*_LISTENER_FIELDS, _CREATE_SSL_CONTEXT, WS_TRANSPORT)


def check() -> None:
    """Check the internals of :data:`REQUIRED` that a class shows (all but
    :data:`WS_TRANSPORT`, which only a live connection has).

    Raises:
        AmqttChanged: naming the first attribute that is gone or changed shape.
    """
    fields = {f.name for f in dataclasses.fields(_ListenerConfig)}
    for internal in _LISTENER_FIELDS:
        if internal.name not in fields:
            raise internal.changed("is no longer a field")
    create = inspect.getattr_static(_AmqttBroker, _CREATE_SSL_CONTEXT.name, None)
    if not isinstance(create, staticmethod):
        raise _CREATE_SSL_CONTEXT.changed("is gone, or no longer a static method")
    if list(inspect.signature(create.__func__).parameters) != ["listener"]:
        raise _CREATE_SSL_CONTEXT.changed("no longer takes (listener)")


def tls_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """The server TLS context of a listener, as aMQTT makes it.

    Raises:
        ConfigError: the certificate or key is missing, unreadable or not a pair.
        AmqttChanged: aMQTT no longer makes it this way.
    """
    try:
        listener = _ListenerConfig(ssl=True, certfile=certfile, keyfile=keyfile)
        create: Any = _AmqttBroker._create_ssl_context
        context = create(listener)
    except AttributeError as exc:
        raise _CREATE_SSL_CONTEXT.changed(f"is gone ({exc})") from exc
    except (OSError, ValueError, ssl.SSLError, _AmqttBrokerError) as exc:
        raise ConfigError(f"TLS certificate {certfile} or key {keyfile}: {exc}") from exc
    if not isinstance(context, ssl.SSLContext):
        raise _CREATE_SSL_CONTEXT.changed(f"returned a {type(context).__name__}")
    return context


def abort_websocket(ws: ServerConnection) -> None:
    """Close a WebSocket's TCP connection now, dropping anything unsent.

    ``websockets`` has no public abort; its connection's ``transport`` is the asyncio
    transport. Without one (another ``websockets``), the closing handshake instead,
    which ``websockets`` bounds by its close timeout.
    """
    transport = getattr(ws, WS_TRANSPORT.name, None)
    if transport is not None:
        transport.abort()
        return
    log.warning("%s", WS_TRANSPORT.changed("is gone: closing with a handshake instead"))
    task = asyncio.get_running_loop().create_task(ws.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()  # referenced until done (asyncio keeps weak ones)
