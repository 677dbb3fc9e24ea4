"""What the router may ask of a client's connection, and why a connection closes.

The calls between the parts of the broker go one way: a
:class:`~broker._connection.Connection` calls the :class:`~broker._router.Router`
(attach, publish, subscribe, acknowledge, detach) and reads the values it returns; the
router reaches a connected session only through the session's :class:`Outlet`, which
the connection implements. Nothing in the router imports the connection, so the
delivery rules can be driven in tests by an outlet that records what it is given.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fieldchat.broker._session import Message

__all__ = ["Close", "Outlet"]


class Close(enum.StrEnum):
    """Why a connection closed; the label of ``fieldchat_broker_dropped_connections``
    (the client's own closes, :attr:`counted` False, are not counted)."""

    CLOSED = "closed"  # end of stream, or DISCONNECT 0x04 (the will is published)
    DISCONNECT = "disconnect"  # a normal DISCONNECT: no will
    NETWORK = "network"
    REFUSED = "refused"  # a CONNACK refusal (counted as a denial instead)
    NOT_CONNECT = "not_connect"  # the first packet was not a CONNECT (MQTT-3.1.0-1)
    CONNECT_TIMEOUT = "connect_timeout"
    MAX_CONNECTIONS = "max_connections"
    PENDING_PER_ADDRESS = "pending_per_address"
    PENDING_EVICTED = "pending_evicted"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    KEEPALIVE = "keepalive"
    TAKEOVER = "takeover"
    REVOKED = "revoked"
    SHUTDOWN = "shutdown"
    STORE_ERROR = "store_error"
    RECEIVE_MAXIMUM = "receive_maximum"
    AUTH_METHOD = "auth_method"
    DENIED_PUBLISH = "denied_publish"

    @property
    def counted(self) -> bool:
        return self not in (Close.CLOSED, Close.DISCONNECT, Close.NETWORK)

    @property
    def graceful(self) -> bool:
        """Close after sending what is buffered (else abort: drop it)."""
        return self in (Close.DISCONNECT, Close.REFUSED)


class Outlet(Protocol):
    """A connected session's way out: what the router and its delivery may ask.

    ``window``: how many QoS 1 messages may be in flight (ours, or less if an MQTT 5
    client's Receive Maximum says so).
    """

    window: int

    def buffered(self) -> int:
        """Bytes written and not yet handed to the kernel (QoS 0 is dropped past a limit)."""
        ...

    def send(self, message: Message, qos: int, packet_id: int | None, *, dup: bool) -> bool:
        """Write a PUBLISH of ``message``; False when it may not go to this client (it
        expired, or exceeds the client's Maximum Packet Size: counted, and for QoS 1
        as good as delivered, MQTT-3.1.2-25)."""
        ...

    def kick(self, reason: Close) -> None:
        """Close from the broker's side, without the will (takeover, revocation…)."""
        ...
