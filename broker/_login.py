"""Steps 2 and 3 of a CONNECT (:mod:`fieldchat.broker._connection`): the credential, the client
id and the will are checked before any session is touched.

A refusal is a value (:class:`~broker._v5.Refusal`: its CONNACK code at each protocol
level and the label it is counted under); the connection writes the CONNACK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fieldchat.broker._acl import Principal
from fieldchat.broker._credentials import verify_credential
from fieldchat.broker._router import Router
from fieldchat.broker._v5 import Refusal
from fieldchat.schemas import mqtt

__all__ = ["Evicted", "LoginRefused", "authenticate"]

log = logging.getLogger("broker")


class LoginRefused(Exception):
    """The CONNECT is refused for :attr:`refusal`."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.name)
        self.refusal = refusal


class Evicted(Exception):
    """The connection was closed (evicted from those waiting) while it logged in."""


async def authenticate(
    router: Router, connect: mqtt.Connect, *, peer: str, closed: Callable[[], bool]
) -> Principal:
    """The principal a CONNECT logs in as.

    The credential is verified off the event loop; ``closed()`` then says whether the
    connection was evicted meanwhile. A wrong credential is answered after
    ``auth_failure_delay_s``. MQTT 5 lets a client send an empty client id and take
    the one the server assigns (MQTT-3.1.3-6, -7): ours is always the username;
    3.1.1 refuses it.

    Raises:
        LoginRefused: a refusal, touching nothing.
        Evicted: ``closed()`` became true while the credential was checked.
    """
    if connect.properties.authentication_method is not None:  # no enhanced auth
        raise LoginRefused(Refusal.AUTH_METHOD)
    account = router.account(connect.username or "")
    ok = False
    if account is not None and connect.password is not None:
        ok = await asyncio.to_thread(verify_credential, connect.password, account.hash)
        # The account may have been revoked or re-issued while we were hashing. A
        # reload (another login, another process's enrollment) makes equal new objects:
        # compare the values, not the objects.
        ok = ok and router.access.accounts.get(account.username) == account
    if closed():
        raise Evicted
    if not ok or account is None:
        log.info("login refused for %r from %s", (connect.username or "")[:64], peer)
        await asyncio.sleep(router.limits.auth_failure_delay_s)
        raise LoginRefused(Refusal.CREDENTIALS)
    assigned = account.username if connect.protocol_level == mqtt.ProtocolLevel.V5 else ""
    if (connect.client_id or assigned) != account.username:
        raise LoginRefused(Refusal.CLIENT_ID)
    principal = Principal(account.username, account.role)
    will = connect.will
    if will is not None:
        rules = router.access.rules
        denial = rules.will(principal, will.topic, will.payload, retain=will.retain)
        if denial is not None:
            log.info("%s: will on %r refused (%s)", principal.username, will.topic[:120], denial)
            raise LoginRefused(Refusal.WILL)
    return principal
